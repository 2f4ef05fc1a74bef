"""Reads for accounts, always filtered by the requesting user."""

from __future__ import annotations

from django.db.models import QuerySet

from webapp.accounts.keys import hash_api_key
from webapp.accounts.models import ApiKey, User
from webapp.core.utils import first_or_not_found


def api_key_list(*, user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).order_by("-created_at")


def api_key_get(*, user: User, key_id: int) -> ApiKey:
    return first_or_not_found(
        api_key_list(user=user).filter(pk=key_id), f"No API key with id {key_id}", param="id"
    )


def api_key_authenticate(*, raw_key: str) -> ApiKey | None:
    """The active key matching ``raw_key`` (with an active user), or None."""
    return (
        ApiKey.objects.select_related("user")
        .filter(hashed_key=hash_api_key(raw_key), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
