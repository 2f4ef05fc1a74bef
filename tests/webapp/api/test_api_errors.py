"""Errors across the API: keys, unknown routes, oversized bodies, rate limits, the schema."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from webapp.accounts.services import api_key_create, api_key_revoke

pytestmark = pytest.mark.django_db


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_a_missing_key_is_a_401_invalid_api_key() -> None:
    """No Authorization header: 401 with code invalid_api_key."""
    response = APIClient().get("/v1/models")
    assert response.status_code == 401
    assert _error(response)["code"] == "invalid_api_key"


@pytest.mark.parametrize("header", ["Bearer sk-co-wrong", "Bearer", "Basic abc", "Bearer a b"])
def test_a_wrong_key_is_a_401(header: str) -> None:
    """A wrong or malformed key is refused with 401 in OpenAI's shape."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/v1/models")
    assert response.status_code == 401
    _error(response)


def test_a_revoked_key_stops_working(user: Any) -> None:
    """A key works until it is revoked, then answers 401."""
    key, raw = api_key_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/v1/models").status_code == 200
    api_key_revoke(api_key=key)
    assert client.get("/v1/models").status_code == 401


def test_unknown_routes_under_v1_are_json_404s(api: Any) -> None:
    """An unknown path under /v1 is a JSON 404, never an HTML page."""
    response = api.get("/v1/engines/davinci")
    assert response.status_code == 404
    assert _error(response)["code"] == "unknown_url"


def test_a_wrong_method_is_a_json_405(api: Any) -> None:
    """PUT on a list endpoint answers 405 in OpenAI's shape."""
    response = api.put("/v1/models", {}, format="json")
    assert response.status_code == 405
    _error(response)


def test_an_oversized_json_body_is_a_413(api: Any, settings: Any) -> None:
    """A body over the request limit answers 413 before it is parsed."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"model": "x", "messages": [{"role": "user", "content": "a" * 5000}]}
    response = api.post("/v1/chat/completions", body, format="json")
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"


def test_malformed_json_is_a_400(api: Any) -> None:
    """A body that is not JSON answers 400, not 500."""
    response = api.generic(
        "POST", "/v1/chat/completions", b"{not json", content_type="application/json"
    )
    assert response.status_code == 400
    _error(response)


def test_rate_limit_headers_and_429_with_retry_after(api: Any, settings: Any) -> None:
    """Every answer carries x-ratelimit-* headers; past the limit, 429 with retry-after."""
    settings.CARRY_ON = {**settings.CARRY_ON, "RATE_LIMIT_PER_MINUTE": 3}
    from django.core.cache import cache

    cache.clear()
    answers = [api.get("/v1/models") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0]["x-ratelimit-limit-requests"] == "3"
    assert answers[1]["x-ratelimit-remaining-requests"] == "1"
    error = _error(answers[3])
    assert error["code"] == "rate_limit_exceeded"
    assert int(answers[3]["retry-after"]) >= 1


def test_a_full_engine_answers_429(api: Any, settings: Any, lively_base_model: Any) -> None:
    """When the serving engine has no room, a request is a 429 with retry-after, not a hang.

    (The engine's own queue bound is tested in tests/customization/test_serving.py; here a
    capacity of zero makes the API's mapping of that refusal deterministic.)
    """
    settings.CARRY_ON = {**settings.CARRY_ON, "SERVING_MAX_PENDING": 0}
    response = api.post(
        "/v1/chat/completions",
        {"model": "lively", "messages": [{"role": "user", "content": "hi"}]},
        format="json",
    )
    assert response.status_code == 429
    assert _error(response)["code"] == "engine_overloaded"
    assert response["retry-after"] == "1"


def test_the_openapi_schema_validates_without_warnings(tmp_path: Any) -> None:
    """drf-spectacular generates a valid schema for every endpoint, with no warnings."""
    out = tmp_path / "schema.json"
    call_command("spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json",
                 "--file", str(out))  # fmt: skip
    import json

    paths = json.loads(out.read_text())["paths"]
    assert "/v1/chat/completions" in paths
    assert "/v1/fine_tuning/jobs/{job_id}/checkpoints" in paths


def test_the_schema_is_served(api: Any) -> None:
    """GET /v1/openapi.json returns the OpenAPI document."""
    response = api.get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
