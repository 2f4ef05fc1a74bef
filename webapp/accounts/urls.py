"""Account pages mounted under /accounts/, beside Django's sign-in and sign-out views."""

from django.urls import path

from webapp.accounts import views

urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("keys/", views.api_key_list, name="api_key_list"),
    path("keys/<int:key_id>/revoke/", views.api_key_revoke_view, name="api_key_revoke"),
]
