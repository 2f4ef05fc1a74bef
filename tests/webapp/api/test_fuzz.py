"""Property-based fuzzing of every API operation with schemathesis, from the published schema.

The schema is loaded from the app itself (``/v1/openapi.json`` over WSGI); every operation
is called with generated requests, authenticated with a real key, and each response must
not be a 5xx, must use a documented status code and content type, and must match the
documented schema. Generated ids and model names are steered, half of the time, to records
that exist (the caller's file, job, adapter, checkpoint; the tiny base) so that the
success responses are checked too, not only the 404s.

Deterministic (``derandomize``) so CI is stable; FUZZ_EXAMPLES=200 FUZZ_RANDOM=1 explores more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import CheckpointFactory, FileFactory, FineTuningJobFactory, JobEventFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.accounts.services import api_key_create
from webapp.evaluations.services import evaluation_create

pytestmark = [pytest.mark.django_db, pytest.mark.fuzz]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
MAX_TOKENS = 4


def _load_schema() -> Any:
    """The schema exactly as the app publishes it (no key needed to read it)."""
    from webapp.wsgi import application

    return schemathesis.openapi.from_wsgi("/v1/openapi.json", application)


# Loaded at collection: schemathesis' fixture-based loader does not support pytest 9 yet.
schema = _load_schema()


@pytest.fixture
def fuzz_world(
    user: Any, lively_base_model: Any, make_adapter: Any, settings: Any
) -> Iterator[dict[str, Any]]:
    """The caller's key and one of each record; jobs are queued, never run, while fuzzing."""
    from tests.helpers.celery_workers import _forget_producers
    from workers.celery_app import app

    unlimited = 1_000_000  # the limits and quotas have their own tests (test_user_limits.py)
    settings.CARRY_ON = {
        **settings.CARRY_ON,
        "RATE_LIMIT_PER_MINUTE": unlimited,
        "USER_RATE_LIMITS": dict.fromkeys(settings.CARRY_ON["USER_RATE_LIMITS"], unlimited),
        "MAX_ACTIVE_JOBS_PER_USER": unlimited,
        "MAX_STORED_BYTES_PER_USER": 2**62,
    }
    # Requests go through the real WSGI handler, in this test's transaction: like Django's
    # test client, keep the handler from closing the connection at the end of each request.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    saved = {k: app.conf[k] for k in ("broker_url", "task_always_eager")}
    app.conf.update(broker_url="memory://", task_always_eager=False)
    _forget_producers()
    _, raw = api_key_create(user=user, name="fuzz")
    job = FineTuningJobFactory(owner=user, status="running")
    JobEventFactory(job=job, type="metrics", data={"step": 1, "train_loss": 1.0})
    adapter = make_adapter(user, lively_base_model, seed=1, suffix="fuzz")
    checkpoint = CheckpointFactory(
        job=adapter.job, step=2, path=adapter.path, sha256=adapter.sha256
    )
    held_out = FileFactory(owner=user, content=toy_jsonl(4))
    evaluation = evaluation_create(user=user, file=held_out.id, models=["lively", adapter.name])
    yield {
        "authorization": f"Bearer {raw}",
        "file": [FileFactory(owner=user, content=toy_jsonl(4)).id, job.training_file_id],
        "job": [job.id, adapter.job_id],
        "model": ["lively", adapter.name, checkpoint.model_name],
        "evaluation": [evaluation.id],
    }
    app.conf.update(saved)
    _forget_producers()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def _maybe(data: st.DataObject, value: Any, choices: list[Any]) -> Any:
    """``value`` as generated, or (half of the time) one of ``choices``."""
    if data.draw(st.booleans(), label="steer"):
        return data.draw(st.sampled_from(choices), label="existing")
    return value


def _steer(case: Any, data: st.DataObject, world: dict[str, Any]) -> None:
    """Point some generated ids at real records; keep generation short."""
    for name, key in (
        ("file_id", "file"),
        ("job_id", "job"),
        ("model", "model"),
        ("evaluation_id", "evaluation"),
    ):
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = _maybe(data, case.path_parameters[name], world[key])
    body = case.body
    if not isinstance(body, dict):
        return
    operation = case.operation.definition.raw.get("operationId")
    if operation == "createChatCompletion":
        if "model" in body:
            body["model"] = _maybe(data, body["model"], world["model"])
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
                body[name] = MAX_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        _hostile(data, body)
    elif operation == "createFineTuningJob":
        if "training_file" in body:
            body["training_file"] = _maybe(data, body["training_file"], world["file"])
        if "model" in body:
            body["model"] = _maybe(data, body["model"], ["lively"])


def _hostile(data: st.DataObject, body: dict[str, Any]) -> None:
    """Now and then, what costs the server most: 100,000-character stops (one, or a list),
    the largest max_tokens and n, a deeply nested value where a plain one belongs."""
    attack = data.draw(
        st.sampled_from([None, None, "stop", "stops", "max_tokens", "n", "nested"]),
        label="hostile",
    )
    if attack == "stop":
        body["stop"] = "s" * 100_000
    elif attack == "stops":
        body["stop"] = ["ab" * 50_000] * 4
    elif attack == "max_tokens":
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = 1_000_000
    elif attack == "n":
        body["n"] = 8
    elif attack == "nested":
        nested: Any = "deep"
        for _ in range(500):  # past MAX_JSON_DEPTH, within what json.dumps can write
            nested = [nested]
        body[data.draw(st.sampled_from(["messages", "stop", "metadata"]), label="where")] = nested


@schema.parametrize()
@schema.given(data=st.data())
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_holds_its_schema_and_never_fails(
    case: Any, data: st.DataObject, fuzz_world: dict[str, Any]
) -> None:
    """No 5xx, documented statuses and content types, responses matching the schema."""
    _steer(case, data, fuzz_world)
    case.call_and_validate(headers={"Authorization": fuzz_world["authorization"]}, checks=CHECKS)


def test_huge_nested_json_to_every_operation_is_a_client_error(
    fuzz_world: dict[str, Any],
) -> None:
    """100,000 levels of nesting (far past Python's recursion limit), or 20,000 messages, in
    the body of every POST operation: never a 5xx."""
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=fuzz_world["authorization"])
    body = "[" * 100_000 + "]" * 100_000
    wide = '{"messages": [' + ",".join(['{"role": "user", "content": "x"}'] * 20_000) + "]"
    for operation in schema.get_all_operations():
        operation = operation.ok()
        if operation.method.upper() not in ("POST", "PUT", "PATCH"):
            continue
        path = operation.path.replace("{job_id}", fuzz_world["job"][0]).replace(
            "{evaluation_id}", fuzz_world["evaluation"][0]
        )
        for payload in (body, wide + "}"):
            response = client.generic(
                operation.method.upper(), path, payload, content_type="application/json"
            )
            # cancel reads no body: it may succeed; the others refuse it
            assert response.status_code < 500, (path, response.content[:300])
            assert response.status_code != 404, path  # it reached the operation
