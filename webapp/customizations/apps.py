from django.apps import AppConfig


class CustomizationsConfig(AppConfig):
    name = "webapp.customizations"
    label = "customizations"
    verbose_name = "Customizations"
