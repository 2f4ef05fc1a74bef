"""Pieces every API object shares: Unix timestamps, a stored failure, a deletion."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers


def error_object(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored failure (``{"code", "message", "param"}``) as a job or evaluation shows it."""
    if not error:
        return None
    return {
        "code": str(error.get("code") or "error"),
        "message": str(error.get("message") or ""),
        "param": error.get("param"),
    }


def unix(value: Any) -> int | None:
    """A datetime as OpenAI's integer Unix seconds."""
    return int(value.timestamp()) if value is not None else None


class DeletedSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    deleted = serializers.BooleanField()
