"""The evaluation pages (see views.py); the API is /v1/evaluations (webapp/api_urls.py)."""

from django.urls import path

from webapp.evaluations import views

urlpatterns = [
    path("evaluations/", views.evaluation_list, name="evaluation_list"),
    path("evaluations/new/", views.evaluation_new, name="evaluation_new"),
    path("evaluations/<str:evaluation_id>/", views.evaluation_detail, name="evaluation_detail"),
    path(
        "evaluations/<str:evaluation_id>/cancel/",
        views.evaluation_cancel_view,
        name="evaluation_cancel",
    ),
]
