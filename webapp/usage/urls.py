"""The usage pages (the API's /v1/usage is in webapp/api_urls.py)."""

from django.urls import path

from webapp.usage import views

urlpatterns = [
    path("", views.usage_page, name="usage"),
    path("export.csv", views.usage_export_csv, name="usage_export_csv"),
]
