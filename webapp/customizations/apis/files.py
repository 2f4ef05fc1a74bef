"""``/v1/files``: upload a JSONL dataset (validated at once), list, retrieve, delete, download."""

from __future__ import annotations

from typing import Any

from django.http import FileResponse, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.core.api.errors import ERRORS, ErrorSerializer
from webapp.core.api.objects import DeletedSerializer, unix
from webapp.core.api.pagination import LIST_PARAMETERS, list_of, paginate
from webapp.core.api.views import ApiView
from webapp.customizations import selectors
from webapp.customizations.models import File
from webapp.customizations.selectors import file_open
from webapp.customizations.services.files import PURPOSES, file_create, file_delete


class FileSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'file'.")
    bytes = serializers.IntegerField()
    created_at = serializers.IntegerField()
    expires_at = serializers.IntegerField(allow_null=True)
    filename = serializers.CharField()
    purpose = serializers.CharField()
    status = serializers.ChoiceField(choices=["uploaded", "processed", "error"])
    status_details = serializers.CharField(allow_null=True)
    format = serializers.CharField(allow_blank=True, help_text="Extension: detected format.")
    n_examples = serializers.IntegerField(help_text="Extension: valid examples.")
    n_tokens = serializers.IntegerField(allow_null=True, help_text="Extension: total tokens.")


def file_object(file: File) -> dict[str, Any]:
    problems = file.problems
    details = None
    if problems:
        first = problems[0]
        where = f"line {first['line']}: " if first.get("line") else ""
        details = f"{where}{first['message']} ({len(problems)} problem(s))"
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": unix(file.created_at),
        "expires_at": None,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": details,
        "format": file.format,
        "n_examples": file.n_examples,
        "n_tokens": file.n_tokens,
    }


class FileUploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)
    purpose = serializers.ChoiceField(choices=PURPOSES)


class FileListCreateApi(ApiView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        operation_id="createFile",
        summary="Upload a JSONL dataset; it is validated now (problems named by line)",
        request={"multipart/form-data": FileUploadSerializer},
        responses={200: FileSerializer, 413: ErrorSerializer, **ERRORS},
    )
    def post(self, request: Request) -> Response:
        form = FileUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        file = file_create(
            user=request.user,
            upload=form.validated_data["file"],
            purpose=form.validated_data["purpose"],
            keep_invalid=False,
        )
        return Response(file_object(file))

    @extend_schema(
        operation_id="listFiles",
        parameters=[*LIST_PARAMETERS, OpenApiParameter("purpose", str)],
        responses={200: list_of(FileSerializer, "FileList"), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        rows = selectors.file_list(user=request.user)
        purpose = request.query_params.get("purpose")
        if purpose:
            rows = rows.filter(purpose=purpose)
        return Response(paginate(request, rows, file_object))


class FileDetailApi(ApiView):
    @extend_schema(operation_id="retrieveFile", responses={200: FileSerializer, **ERRORS})
    def get(self, request: Request, file_id: str) -> Response:
        return Response(file_object(selectors.file_get(user=request.user, file_id=file_id)))

    @extend_schema(
        operation_id="deleteFile",
        responses={200: DeletedSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def delete(self, request: Request, file_id: str) -> Response:
        file = selectors.file_get(user=request.user, file_id=file_id)
        file_delete(file=file)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContentApi(ApiView):
    @extend_schema(
        operation_id="downloadFile",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY),
            **ERRORS,
        },
    )
    def get(self, request: Request, file_id: str) -> HttpResponse:
        file = selectors.file_get(user=request.user, file_id=file_id)
        # Streamed in blocks: a large upload is never held in memory whole.
        return FileResponse(
            file_open(file=file),
            content_type="application/octet-stream",
            as_attachment=True,
            filename=f"{file.id}.jsonl",
        )
