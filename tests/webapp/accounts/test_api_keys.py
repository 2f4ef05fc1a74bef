from __future__ import annotations

from typing import Any

import pytest
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.test import APIRequestFactory

from tests.factories import ApiKeyFactory, UserFactory
from webapp.accounts.authentication import ApiKeyAuthentication
from webapp.accounts.keys import hash_api_key
from webapp.accounts.models import ApiKey
from webapp.accounts.selectors import api_key_get, api_key_list
from webapp.accounts.services import api_key_create, api_key_revoke
from webapp.core.exceptions import NotFoundError

pytestmark = pytest.mark.django_db


def _authenticate(raw: str) -> Any:
    request = APIRequestFactory().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    return ApiKeyAuthentication().authenticate(request)


def test_api_key_is_returned_once_and_only_its_hash_is_stored() -> None:
    """The raw key exists only in the return value; the row holds a prefix and a hash."""
    key, raw = api_key_create(user=UserFactory(), name="ci")
    assert raw.startswith("sk-co-")
    assert raw.startswith(key.prefix)
    assert len(key.prefix) < 16
    stored = ApiKey.objects.get(pk=key.pk)
    assert stored.hashed_key == hash_api_key(raw)
    assert raw not in {str(value) for value in stored.__dict__.values()}


def test_bearer_authentication_accepts_an_active_key_and_records_its_use() -> None:
    """A valid bearer key authenticates its user and sets last_used_at."""
    user = UserFactory()
    key, raw = api_key_create(user=user)
    authenticated_user, auth = _authenticate(raw)
    assert authenticated_user == user
    assert auth.pk == key.pk
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_revoked_or_unknown_keys_do_not_authenticate() -> None:
    """A revoked key and a made-up key are both refused."""
    key, raw = api_key_create(user=UserFactory())
    api_key_revoke(api_key=key)
    with pytest.raises(AuthenticationFailed):
        _authenticate(raw)
    with pytest.raises(AuthenticationFailed):
        _authenticate("sk-co-not-a-key")


def test_another_users_api_key_is_not_found_and_never_listed() -> None:
    """Keys are visible to their owner only."""
    mine, theirs = UserFactory(), UserFactory()
    other = ApiKeyFactory(user=theirs)
    assert list(api_key_list(user=mine)) == []
    with pytest.raises(NotFoundError):
        api_key_get(user=mine, key_id=other.pk)
    assert api_key_get(user=theirs, key_id=other.pk) == other


def test_the_raw_key_is_nowhere_in_the_database() -> None:
    """After creating and using a key, a dump of every table holds its hash, never the key."""
    import io

    from django.core.management import call_command

    user = UserFactory()
    _, raw = api_key_create(user=user, name="dumped")
    _authenticate(raw)
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    assert hash_api_key(raw) in dump.getvalue()
    assert raw not in dump.getvalue()
    assert raw[len("sk-co-") :] not in dump.getvalue()
