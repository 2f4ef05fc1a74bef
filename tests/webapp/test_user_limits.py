"""Per-user quotas and rate limits: each refusal names its limit and setting."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client

from tests.factories import FileFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.webapp.api.conftest import bearer_client
from webapp.accounts.models import ApiKey
from webapp.accounts.services import api_key_create
from webapp.core.exceptions import ApplicationError

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_counters() -> Iterator[None]:
    """Rate-limit counters from zero, and no serving engine left behind."""
    from webapp.serving.engine import reset_engine

    cache.clear()
    yield
    cache.clear()
    reset_engine()


def _limits(settings: Any, **values: Any) -> None:
    settings.CARRY_ON = {**settings.CARRY_ON, **values}


def _user_rates(settings: Any, **scopes: int) -> None:
    _limits(settings, USER_RATE_LIMITS={**settings.CARRY_ON["USER_RATE_LIMITS"], **scopes})


def _upload(api: Any, data: bytes) -> Any:
    return api.post(
        "/v1/files", {"file": io.BytesIO(data), "purpose": "fine-tune"}, format="multipart"
    )


def test_api_keys_are_capped_per_user(settings: Any) -> None:
    """Past MAX_API_KEYS_PER_USER active keys a new one is refused (403), on the page too;
    revoking one makes room."""
    _limits(settings, MAX_API_KEYS_PER_USER=2)
    user = UserFactory()
    first, _ = api_key_create(user=user)
    api_key_create(user=user)
    with pytest.raises(ApplicationError) as refused:
        api_key_create(user=user)
    assert refused.value.status == 403
    assert "CARRY_ON_MAX_API_KEYS_PER_USER" in refused.value.message
    client = Client()
    client.force_login(user)
    page = client.post("/accounts/keys/", {"name": "third"})
    assert page.status_code == 403
    assert "CARRY_ON_MAX_API_KEYS_PER_USER" in page.content.decode()
    first.revoked_at = first.created_at
    first.save()
    api_key_create(user=user)
    assert ApiKey.objects.filter(user=user, revoked_at__isnull=True).count() == 2


def test_active_jobs_are_capped_per_user(settings: Any, tiny_base_model: Any) -> None:
    """Past MAX_ACTIVE_JOBS_PER_USER unfinished jobs a new one gets 403 naming the quota;
    another user is unaffected."""
    _limits(settings, MAX_ACTIVE_JOBS_PER_USER=1)
    user, other = UserFactory(), UserFactory()
    api = bearer_client(user)
    body = {"model": "tiny", "training_file": FileFactory(owner=user).id}
    assert api.post("/v1/fine_tuning/jobs", body, format="json").status_code == 200
    refused = api.post("/v1/fine_tuning/jobs", body, format="json")
    assert refused.status_code == 403, refused.content
    error = refused.json()["error"]
    assert error["code"] == "active_jobs_quota_exceeded"
    assert "CARRY_ON_MAX_ACTIVE_JOBS_PER_USER" in error["message"]
    theirs = {"model": "tiny", "training_file": FileFactory(owner=other).id}
    assert (
        bearer_client(other).post("/v1/fine_tuning/jobs", theirs, format="json").status_code == 200
    )


def test_stored_bytes_are_capped_per_user(settings: Any, tiny_base_model: Any) -> None:
    """An upload that would take the user past MAX_STORED_BYTES_PER_USER gets 403."""
    data = toy_jsonl(8)
    _limits(settings, MAX_STORED_BYTES_PER_USER=len(data) * 2)
    api = bearer_client(UserFactory())
    assert _upload(api, data).status_code == 200
    assert _upload(api, data).status_code == 200
    refused = _upload(api, data)
    assert refused.status_code == 403, refused.content
    error = refused.json()["error"]
    assert error["code"] == "storage_quota_exceeded"
    assert "CARRY_ON_MAX_STORED_BYTES_PER_USER" in error["message"]


def test_uploads_are_rate_limited_per_user_across_keys(settings: Any, tiny_base_model: Any) -> None:
    """Two keys of one user share the user's upload limit; the 429 names the setting."""
    _user_rates(settings, uploads=2)
    user = UserFactory()
    keys = [bearer_client(user), bearer_client(user)]
    assert _upload(keys[0], toy_jsonl(2)).status_code == 200
    assert _upload(keys[1], toy_jsonl(2)).status_code == 200
    refused = _upload(keys[0], toy_jsonl(2))
    assert refused.status_code == 429
    assert refused["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "user_rate_limit_uploads"
    assert "CARRY_ON_USER_UPLOADS_PER_MINUTE" in error["message"]
    assert _upload(bearer_client(UserFactory()), toy_jsonl(2)).status_code == 200


def test_job_creation_and_chat_are_rate_limited_per_user(
    settings: Any, tiny_base_model: Any
) -> None:
    """Job creation and chat each have their own per-user limit."""
    _user_rates(settings, jobs=1, chat=1)
    user = UserFactory()
    api = bearer_client(user)
    body = {"model": "tiny", "training_file": FileFactory(owner=user).id}
    assert api.post("/v1/fine_tuning/jobs", body, format="json").status_code == 200
    refused = bearer_client(user).post("/v1/fine_tuning/jobs", body, format="json")
    assert refused.json()["error"]["code"] == "user_rate_limit_jobs"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert api.post("/v1/chat/completions", chat, format="json").status_code == 200
    refused = bearer_client(user).post("/v1/chat/completions", chat, format="json")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "user_rate_limit_chat"


def test_the_pages_count_against_the_same_user_limits(settings: Any, tiny_base_model: Any) -> None:
    """The playground, uploads and the live job status on the pages are limited per user."""
    _user_rates(settings, chat=1, live=2)
    user = UserFactory()
    client = Client()
    client.force_login(user)
    form = {"model": "tiny", "prompt": "hi", "temperature": 1, "top_p": 1, "max_tokens": 1}
    assert client.post("/playground/", form).status_code == 200
    refused = client.post("/playground/", form)
    assert refused.status_code == 429
    assert "CARRY_ON_USER_CHATS_PER_MINUTE" in refused.content.decode()
    assert int(refused["Retry-After"]) > 0
    statuses = [client.get("/jobs/ftjob-none/live/").status_code for _ in range(3)]
    assert statuses[:2] == [404, 404]
    assert statuses[2] == 429


def test_the_request_limit_holds_per_user_whatever_the_keys(settings: Any) -> None:
    """Many keys do not multiply the per-key request limit: the user's own limit holds."""
    _user_rates(settings, requests=3)
    user = UserFactory()
    statuses = [bearer_client(user).get("/v1/models").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_sign_up_is_throttled_per_address(settings: Any) -> None:
    """Past SIGNUPS_PER_HOUR sign-up posts from one address answer 429 with Retry-After."""
    _limits(settings, SIGNUP_ENABLED=True, SIGNUPS_PER_HOUR=2)
    statuses = []
    for index in range(3):
        client = Client(REMOTE_ADDR="10.1.1.1")
        form = {
            "username": f"new{index}",
            "password1": "a-Long-pass-9",
            "password2": "a-Long-pass-9",
        }
        statuses.append(client.post("/accounts/signup/", form).status_code)
    assert statuses == [302, 302, 429]
    other = Client(REMOTE_ADDR="10.1.1.2").post(
        "/accounts/signup/",
        {"username": "elsewhere", "password1": "a-Long-pass-9", "password2": "a-Long-pass-9"},
    )
    assert other.status_code == 302
