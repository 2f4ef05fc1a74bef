"""The browser pages (see views.py); the API lives under /v1 (webapp/api_urls.py)."""

from django.urls import path

from webapp.customizations import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("files/", views.file_list, name="file_list"),
    path("files/examples/", views.file_example_create, name="file_example_create"),
    path("files/<str:file_id>/", views.file_detail, name="file_detail"),
    path("files/<str:file_id>/jobs/", views.job_create_view, name="job_create"),
    path("jobs/", views.job_list, name="job_list"),
    path("jobs/new/", views.job_new, name="job_new"),
    path("jobs/estimate/", views.job_estimate, name="job_estimate"),
    path("jobs/<str:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<str:job_id>/live/", views.job_live, name="job_live"),
    path("jobs/<str:job_id>/cancel/", views.job_cancel_view, name="job_cancel"),
    path("jobs/<str:job_id>/retry/", views.job_retry_view, name="job_retry"),
    path("adapters/", views.adapter_list, name="adapter_list"),
    path("adapters/<int:adapter_id>/rename/", views.adapter_rename_view, name="adapter_rename"),
    path("adapters/<int:adapter_id>/active/", views.adapter_active_view, name="adapter_active"),
    path("adapters/<int:adapter_id>/delete/", views.adapter_delete_view, name="adapter_delete"),
    path("adapters/<int:adapter_id>/download/", views.adapter_download, name="adapter_download"),
    path("playground/", views.playground, name="playground"),
]
