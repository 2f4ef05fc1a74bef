from django.urls import path

from webapp.customizations import views

urlpatterns = [
    path("", views.file_list, name="dashboard"),
    path("files/<str:file_id>/", views.file_detail, name="file_detail"),
    path("files/<str:file_id>/jobs/", views.job_create_view, name="job_create"),
    path("jobs/<str:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<str:job_id>/cancel/", views.job_cancel_view, name="job_cancel"),
]
