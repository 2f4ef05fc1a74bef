"""``/v1/models``: the bases and the caller's fine-tuned models (adapters); delete an adapter."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from customization.presets import ADAPTER_KINDS
from webapp.core.api.errors import ERRORS, ErrorSerializer
from webapp.core.api.objects import DeletedSerializer, unix
from webapp.core.api.views import ApiView
from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.models import Adapter, BaseModel
from webapp.customizations.services.adapters import adapter_delete


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'model'.")
    created = serializers.IntegerField()
    owned_by = serializers.CharField()
    kind = serializers.ChoiceField(
        choices=ADAPTER_KINDS, required=False, help_text="Extension, fine-tuned models: kind"
    )
    depth = serializers.IntegerField(
        required=False, allow_null=True, help_text="Extension: a tail's depth (null: carry-on)"
    )
    preset = serializers.CharField(
        required=False, allow_null=True, help_text="Extension: the preset it was trained with"
    )


def base_object(base: BaseModel) -> dict[str, Any]:
    return {
        "id": base.name,
        "object": "model",
        "created": unix(base.created_at),
        "owned_by": "system",
    }


def adapter_object(adapter: Adapter) -> dict[str, Any]:
    return {
        "id": adapter.name,
        "object": "model",
        "created": unix(adapter.created_at),
        "owned_by": adapter.owner.username,
        "kind": adapter.kind,
        "depth": adapter.depth,
        "preset": adapter.preset or None,
    }


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField(help_text="Always 'list'.")
    data = ModelSerializer(many=True)


class ModelListApi(ApiView):
    @extend_schema(operation_id="listModels", responses={200: ModelListSerializer, **ERRORS})
    def get(self, request: Request) -> Response:
        bases = [base_object(b) for b in selectors.base_model_list()]
        adapters = selectors.adapter_list(user=request.user, active_only=True)
        owned = [adapter_object(a) for a in adapters.select_related("owner")]
        return Response({"object": "list", "data": bases + owned})


class ModelDetailApi(ApiView):
    @extend_schema(operation_id="retrieveModel", responses={200: ModelSerializer, **ERRORS})
    def get(self, request: Request, model: str) -> Response:
        resolved = selectors.model_resolve(user=request.user, name=model)
        if resolved.adapter_id is None:
            return Response(base_object(resolved.base))
        if resolved.adapter_id == model:  # an adapter (a checkpoint is named by its row's pk)
            return Response(adapter_object(selectors.adapter_get(user=request.user, name=model)))
        return Response(
            {"id": model, "object": "model", "created": unix(resolved.base.created_at),
             "owned_by": request.user.username}
        )  # fmt: skip

    @extend_schema(
        operation_id="deleteModel",
        responses={200: DeletedSerializer, 403: ErrorSerializer, **ERRORS},
    )
    def delete(self, request: Request, model: str) -> Response:
        if selectors.base_model_list(enabled_only=False).filter(name=model).exists():
            raise ApplicationError(
                f"'{model}' is a base model; only your fine-tuned models can be deleted",
                param="model",
                code="permission_denied",
                status=403,
            )
        adapter = selectors.adapter_get(user=request.user, name=model)
        adapter_delete(adapter=adapter)
        return Response({"id": model, "object": "model", "deleted": True})
