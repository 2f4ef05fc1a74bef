"""Writes for accounts: users and API keys."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from webapp.accounts.keys import hash_api_key
from webapp.accounts.models import ApiKey, User
from webapp.core.exceptions import ApplicationError

KEY_PREFIX = "sk-co-"
PREFIX_LENGTH = len(KEY_PREFIX) + 6
# last_used_at is a hint, not an audit log: write it at most this often per key.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def user_create(
    *,
    username: str,
    email: str = "",
    password: str | None = None,
    is_staff: bool = False,
    is_superuser: bool = False,
) -> User:
    if not username.strip():
        raise ApplicationError("username must not be empty", param="username")
    if User.objects.filter(username=username).exists():
        raise ApplicationError(
            f"user {username!r} already exists", param="username", status=409, code="conflict"
        )
    user = User(username=username, email=email, is_staff=is_staff, is_superuser=is_superuser)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.full_clean(exclude=["password"])
    user.save()
    return user


@transaction.atomic
def api_key_create(*, user: User, name: str = "") -> tuple[ApiKey, str]:
    """Create a key; returns the record and the raw key, which is never stored or shown again.

    A user holds at most MAX_API_KEYS_PER_USER active keys (the row lock counts racing
    requests one after the other), so keys cannot multiply the per-key rate limit.
    """
    limit = int(settings.CARRY_ON["MAX_API_KEYS_PER_USER"])
    User.objects.select_for_update().filter(pk=user.pk).first()
    if ApiKey.objects.filter(user=user, revoked_at__isnull=True).count() >= limit:
        raise ApplicationError(
            f"You have {limit} active API keys, the most allowed "
            "(CARRY_ON_MAX_API_KEYS_PER_USER). Revoke one you no longer use.",
            status=403,
            code="api_keys_quota_exceeded",
        )
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        user=user, name=name[:100], prefix=raw[:PREFIX_LENGTH], hashed_key=hash_api_key(raw)
    )
    return key, raw


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke a key (idempotent): it stops authenticating at once."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_key_touch(*, api_key: ApiKey) -> None:
    """Record a use, at most once per LAST_USED_RESOLUTION."""
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at >= LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
