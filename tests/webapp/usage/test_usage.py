"""Usage records: every way a chat ends, batched writes, history that outlives an adapter,
the pages, the CSV, /v1/usage and the admin, each user seeing only their own."""

from __future__ import annotations

import csv
import datetime
import gc
import io
import json
from typing import Any

import pytest
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from tests.factories import UserFactory
from tests.webapp.usage.conftest import wait_for_records
from webapp.accounts.services import api_key_create
from webapp.usage import services
from webapp.usage.models import UsageRecord
from webapp.usage.services import UsageEntry, usage_flush, usage_record

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "tell me a story about rivers"}]


def _api(user: Any) -> tuple[Any, APIClient]:
    key, raw = api_key_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return key, client


def _entry(user: Any, **fields: Any) -> UsageEntry:
    values: dict[str, Any] = {
        "user_id": user.pk, "api_key_id": None, "model": "lively", "adapter_name": None,
        "prompt_tokens": 5, "completion_tokens": 7, "time_to_first_token": 0.01,
        "duration": 0.1, "outcome": "stop", "created_at": timezone.now(),
    }  # fmt: skip
    return UsageEntry(**{**values, **fields})


def test_api_chats_record_their_tokens_and_how_they_ended(lively_base_model: Any) -> None:
    """Non-streamed and streamed chats each add a record equal to their usage; running out
    of tokens reads "length"."""
    user = UserFactory()
    key, api = _api(user)
    plain = api.post(
        "/v1/chat/completions",
        {"model": "lively", "messages": HELLO, "max_tokens": 3, "temperature": 0},
        format="json",
    )
    assert plain.status_code == 200, plain.content
    streamed = api.post(
        "/v1/chat/completions",
        {
            "model": "lively", "messages": HELLO, "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        },
        format="json",
    )  # fmt: skip
    body = b"".join(streamed.streaming_content).decode()
    assert "[DONE]" in body
    first, second = wait_for_records(user, 2)
    usage = plain.json()["usage"]
    assert (first.prompt_tokens, first.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert first.outcome == plain.json()["choices"][0]["finish_reason"] == "length"
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line[6:].startswith("{")]
    finish = next(
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"][-1:] and c["choices"][0]["finish_reason"]
    )
    assert second.outcome == finish
    assert second.completion_tokens == chunks[-1]["usage"]["completion_tokens"]
    assert first.api_key_id == second.api_key_id == key.pk


def test_a_cancelled_or_abandoned_chat_reads_disconnected(lively_base_model: Any) -> None:
    """A client that leaves mid-answer (the API cancels) or a completion nobody reads to
    the end is recorded once as "disconnected", with the tokens it got."""
    from webapp.serving.services import ChatRequest, chat_completion_submit

    user = UserFactory()
    request = ChatRequest(model="lively", messages=HELLO, max_tokens=50, temperature=0)
    submitted = chat_completion_submit(user=user, request=request)
    events = submitted.completion.events()
    next(events)
    submitted.completion.cancel()
    submitted.completion.cancel()  # the stream's own clean-up cancels again: no second record
    events.close()
    abandoned = chat_completion_submit(user=user, request=request)
    del abandoned
    gc.collect()
    cancelled, dropped = wait_for_records(user, 2)
    assert cancelled.outcome == dropped.outcome == "disconnected"
    assert cancelled.completion_tokens <= 1
    assert cancelled.api_key is None  # submitted without a key: the browser's session
    assert UsageRecord.objects.count() == 2


def test_an_adapter_that_cannot_be_served_is_an_error_record(
    lively_base_model: Any, make_adapter: Any
) -> None:
    """A 500 before decoding (a damaged artifact) is recorded as an error with no tokens;
    a 4xx refusal is not the user's usage."""
    user = UserFactory()
    adapter = make_adapter(user, lively_base_model, seed=1)
    UsageRecord.objects.all().delete()
    type(adapter).objects.filter(pk=adapter.pk).update(sha256="0" * 64)
    _, api = _api(user)
    broken = api.post(
        "/v1/chat/completions", {"model": adapter.name, "messages": HELLO}, format="json"
    )
    assert broken.status_code == 500
    too_long = api.post(
        "/v1/chat/completions",
        {"model": "lively", "messages": [{"role": "user", "content": "x" * 20000}]},
        format="json",
    )
    assert too_long.status_code == 400
    [record] = wait_for_records(user, 1)
    assert (record.outcome, record.completion_tokens, record.adapter) == ("error", 0, adapter)


def test_deleting_an_adapter_keeps_its_usage(lively_base_model: Any, make_adapter: Any) -> None:
    """A chat on an adapter points at it; once the adapter is deleted the record stays,
    with its model name and no adapter."""
    from webapp.customizations.services.adapters import adapter_delete

    user = UserFactory()
    adapter = make_adapter(user, lively_base_model, seed=1)
    _, api = _api(user)
    reply = api.post(
        "/v1/chat/completions",
        {"model": adapter.name, "messages": HELLO, "max_tokens": 2},
        format="json",
    )
    assert reply.status_code == 200
    [record] = wait_for_records(user, 1)
    assert record.adapter == adapter
    adapter_delete(adapter=adapter)
    record.refresh_from_db()
    assert (record.adapter, record.model) == (None, adapter.name)


def test_records_wait_in_the_buffer_and_are_written_in_one_insert(
    django_assert_max_num_queries: Any,
) -> None:
    """Recording touches no database; a flush writes a whole batch in a few queries."""
    user = UserFactory()
    with django_assert_max_num_queries(0):
        for _ in range(300):
            usage_record(entry=_entry(user))
    with django_assert_max_num_queries(8):  # existence checks + one insert, not 300
        usage_flush()
    assert UsageRecord.objects.filter(user=user).count() == 300


def test_records_survive_a_database_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write keeps the batch for the next round: nothing is lost."""
    user = UserFactory()
    real_write = services.usage_write

    def down(*, entries: list[UsageEntry]) -> int:
        raise OperationalError("the database restarted")

    monkeypatch.setattr(services, "usage_write", down)
    usage_record(entry=_entry(user))
    with pytest.raises(OperationalError):
        usage_flush()
    assert len(services.usage_buffer) == 1
    monkeypatch.setattr(services, "usage_write", real_write)
    assert usage_flush() == 1
    assert UsageRecord.objects.filter(user=user).count() == 1


def test_references_deleted_before_the_write(make_adapter: Any, lively_base_model: Any) -> None:
    """A key deleted before the write reads None; a deleted user's record is dropped."""
    user, gone = UserFactory(), UserFactory()
    key, _ = api_key_create(user=user)
    usage_record(entry=_entry(user, api_key_id=key.pk))
    usage_record(entry=_entry(gone))
    key.delete()
    gone.delete()
    assert usage_flush() == 1
    [record] = UsageRecord.objects.all()
    assert (record.user, record.api_key) == (user, None)


def test_pages_csv_and_api_show_only_your_own_usage() -> None:
    """The usage page, the dashboard chart, the CSV and /v1/usage list the caller's
    records only; anonymous visitors are sent to log in."""
    owner, other = UserFactory(), UserFactory()
    yesterday = timezone.now() - datetime.timedelta(days=1)
    usage_record(entry=_entry(owner, model="ft:lively:owner:a:1", created_at=yesterday))
    usage_record(entry=_entry(owner, model="lively", prompt_tokens=1, completion_tokens=2))
    usage_record(entry=_entry(other, model="ft:lively:other:secret:2"))
    usage_flush()
    mine = Client()
    mine.force_login(owner)
    page = mine.get("/usage/").content.decode()
    assert "ft:lively:owner:a:1" in page
    assert "secret" not in page
    dashboard = mine.get("/").content.decode()
    assert 'class="usage-chart"' in dashboard
    assert "secret" not in dashboard
    body = b"".join(mine.get("/usage/export.csv").streaming_content).decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert sorted(r["model"] for r in rows) == ["ft:lively:owner:a:1", "lively"]
    assert {r["total_tokens"] for r in rows} == {"12", "3"}
    _, api = _api(owner)
    listed = api.get("/v1/usage?limit=1").json()
    assert listed["object"] == "list"
    assert listed["has_more"] is True
    assert listed["data"][0]["model"] == "lively"  # newest first
    nxt = api.get(f"/v1/usage?after={listed['last_id']}").json()
    assert [r["model"] for r in nxt["data"]] == ["ft:lively:owner:a:1"]
    anonymous = Client()
    assert anonymous.get("/usage/export.csv").status_code == 302
    assert APIClient().get("/v1/usage").status_code == 401


def test_admin_lists_and_summarises_usage_per_user_and_model() -> None:
    """Staff see every user's records with filters and a per-user, per-model summary."""
    owner, other = UserFactory(), UserFactory()
    for _ in range(3):
        usage_record(entry=_entry(owner, model="ft:lively:owner:a:1"))
    usage_record(entry=_entry(other, model="lively", outcome="error"))
    usage_flush()
    staff = Client()
    staff.force_login(UserFactory(is_staff=True, is_superuser=True))
    page = staff.get("/admin/usage/usagerecord/").content.decode()
    assert 'id="usage-summary"' in page
    assert owner.username in page
    assert other.username in page
    filtered = staff.get(f"/admin/usage/usagerecord/?user__id__exact={owner.pk}")
    summary = filtered.context["usage_summary"]
    assert [(r["user__username"], r["model"], r["requests"]) for r in summary] == [
        (owner.username, "ft:lively:owner:a:1", 3)
    ]
    assert summary[0]["completion_tokens"] == 21
    assert staff.get("/admin/usage/usagerecord/add/").status_code == 403
