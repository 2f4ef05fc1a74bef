"""/v1/evaluations: create, list, retrieve, cancel, shaped like the rest of /v1; errors name
their parameter; per-user limits."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import UserFactory
from tests.webapp.api.conftest import bearer_client

pytestmark = pytest.mark.django_db


def _create(api: Any, **body: Any) -> Any:
    return api.post("/v1/evaluations", body, format="json")


def test_create_retrieve_list_and_cancel(
    api: Any, user: Any, tiny_base_model: Any, held_out: Any, two_adapters: list[Any]
) -> None:
    """A created evaluation is queued with one result per model; it lists, reads and cancels."""
    models = ["tiny", two_adapters[0].name]
    response = _create(api, file=held_out.id, models=models, exact_match=2, max_tokens=8)
    assert response.status_code == 200, response.json()
    created = response.json()
    assert created["id"].startswith("eval-")
    assert created["object"] == "evaluation"
    assert (created["status"], created["model"], created["file"]) == ("queued", "tiny", held_out.id)
    assert created["models"] == models
    assert (created["limit"], created["exact_match"], created["max_tokens"]) == (6, 2, 8)
    assert [r["kind"] for r in created["results"]] == ["base", "adapter"]
    assert all(r["loss"] is None and r["samples"] == [] for r in created["results"])

    assert api.get(f"/v1/evaluations/{created['id']}").json() == created
    listed = api.get("/v1/evaluations").json()
    assert (listed["object"], listed["first_id"], listed["has_more"]) == (
        "list",
        created["id"],
        False,
    )

    cancelled = api.post(f"/v1/evaluations/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    again = api.post(f"/v1/evaluations/{created['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "invalid_transition"


def test_bad_requests_name_their_parameter(api: Any, tiny_base_model: Any, held_out: Any) -> None:
    """Unknown model 404 naming models; missing or unknown arguments 400 naming them."""
    unknown = _create(api, file=held_out.id, models=["tiny", "ft:tiny:x::ftjob-nope"])
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "models"
    assert "ft:tiny:x::ftjob-nope" in unknown.json()["error"]["message"]
    missing = _create(api, file=held_out.id)
    assert missing.status_code == 400
    assert missing.json()["error"] == {
        "message": "models: This field is required.",
        "type": "invalid_request_error",
        "param": "models",
        "code": "missing_required_parameter",
    }
    extra = _create(api, file=held_out.id, models=["tiny"], temperature=0)
    assert (extra.status_code, extra.json()["error"]["param"]) == (400, "temperature")
    limit = _create(api, file=held_out.id, models=["tiny"], limit=-1)
    assert (limit.status_code, limit.json()["error"]["param"]) == (400, "limit")


def test_another_users_evaluation_and_adapter_are_404(
    api: Any, tiny_base_model: Any, held_out: Any, make_adapter: Any
) -> None:
    """Isolation: someone else's evaluation id and adapter both read as missing."""
    created = _create(api, file=held_out.id, models=["tiny"]).json()
    other = UserFactory()
    theirs = bearer_client(other)
    assert theirs.get(f"/v1/evaluations/{created['id']}").status_code == 404
    assert theirs.post(f"/v1/evaluations/{created['id']}/cancel").status_code == 404
    assert theirs.get("/v1/evaluations").json()["data"] == []
    adapter = make_adapter(other, tiny_base_model, seed=4)
    refused = _create(api, file=held_out.id, models=[adapter.name])
    assert (refused.status_code, refused.json()["error"]["param"]) == (404, "models")


def test_evaluation_creations_are_rate_limited_per_user(
    api: Any, tiny_base_model: Any, held_out: Any, settings: Any
) -> None:
    """Past CARRY_ON_USER_EVALUATIONS_PER_MINUTE creations: 429 with retry-after."""
    limits = {**settings.CARRY_ON["USER_RATE_LIMITS"], "evaluations": 1}
    settings.CARRY_ON = {**settings.CARRY_ON, "USER_RATE_LIMITS": limits}
    assert _create(api, file=held_out.id, models=["tiny"]).status_code == 200
    refused = _create(api, file=held_out.id, models=["tiny"])
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "user_rate_limit_evaluations"
    assert "CARRY_ON_USER_EVALUATIONS_PER_MINUTE" in refused.json()["error"]["message"]
    assert int(refused["retry-after"]) >= 1


def test_the_schema_lists_the_evaluation_operations(api: Any) -> None:
    """The published OpenAPI schema documents create, list, retrieve and cancel."""
    paths = api.get("/v1/openapi.json").json()["paths"]
    assert {"post", "get"} <= set(paths["/v1/evaluations"])
    assert "get" in paths["/v1/evaluations/{evaluation_id}"]
    assert "post" in paths["/v1/evaluations/{evaluation_id}/cancel"]


@pytest.mark.django_db(transaction=True)
def test_the_openai_client_creates_and_reads_an_evaluation(
    live_server: Any, tiny_base_model: Any
) -> None:
    """The README's example: the official client's generic post/get, errors as its classes."""
    import openai

    from tests.factories import FileFactory
    from tests.webapp.evaluations.conftest import problems_jsonl
    from webapp.accounts.services import api_key_create

    user = UserFactory()
    file = FileFactory(owner=user, content=problems_jsonl(2))
    _, raw = api_key_create(user=user)
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=raw, max_retries=0)
    created = client.post(
        "/evaluations", body={"file": file.id, "models": ["tiny"], "exact_match": 0}, cast_to=dict
    )
    read = client.get(f"/evaluations/{created['id']}", cast_to=dict)
    assert read["id"] == created["id"]
    assert read["results"][0]["model"] == "tiny"
    with pytest.raises(openai.NotFoundError) as refused:
        client.post("/evaluations", body={"file": file.id, "models": ["nope"]}, cast_to=dict)
    assert refused.value.body["param"] == "models"
