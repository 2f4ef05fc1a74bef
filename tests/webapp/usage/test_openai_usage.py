"""The acceptance story: a chat through the official ``openai`` client on a live server is
recorded once with the response's token counts, shows on the owner's dashboard chart, in
their CSV and /v1/usage, and nowhere for anyone else."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import time
from typing import Any

import openai
import pytest
from django.test import Client

from tests.factories import UserFactory
from tests.webapp.usage.conftest import wait_for_records
from webapp.accounts.services import api_key_create
from webapp.usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

CHART_SERIES = re.compile(r'class="usage-chart"[^>]*data-series="([^"]*)"')


def chart_series(page: str) -> dict[str, list[int]]:
    """What the dashboard's usage chart draws: {model: tokens per day}."""
    match = CHART_SERIES.search(page)
    return json.loads(html.unescape(match.group(1))) if match else {}


def csv_rows(response: Any) -> list[dict[str, str]]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


@pytest.mark.integration
@pytest.mark.slow
def test_a_streamed_chat_adds_one_usage_record_shown_to_its_owner_only(
    live_server: Any, smollm2: Any
) -> None:
    """One streamed chat on the real base: one record with the response's usage; the
    dashboard chart, the CSV and /v1/usage show it to its owner and to nobody else."""
    owner, other = UserFactory(), UserFactory()
    key, raw = api_key_create(user=owner)
    client = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=raw, max_retries=0, timeout=300
    )
    stream = client.chat.completions.create(
        model=smollm2.name,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = list(stream)[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0

    [record] = wait_for_records(owner, 1)
    time.sleep(0.5)  # nothing else arrives later
    assert UsageRecord.objects.count() == 1
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert record.model == smollm2.name
    assert record.api_key_id == key.pk
    assert record.adapter is None
    assert record.outcome in ("stop", "length")
    assert record.time_to_first_token is not None
    assert 0 < record.time_to_first_token <= record.duration

    mine, theirs = Client(), Client()
    mine.force_login(owner)
    theirs.force_login(other)
    series = chart_series(mine.get("/").content.decode())
    assert sum(series[smollm2.name]) == usage.total_tokens
    [row] = csv_rows(mine.get("/usage/export.csv"))
    assert row["id"] == record.id
    assert (int(row["prompt_tokens"]), int(row["completion_tokens"])) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row["api_key"] == key.prefix
    listed = client.get("/usage", cast_to=object)
    assert [r["id"] for r in listed["data"]] == [record.id]
    assert listed["data"][0]["total_tokens"] == usage.total_tokens

    page = theirs.get("/").content.decode()
    assert chart_series(page) == {}
    assert "No chat completions yet" in page
    assert csv_rows(theirs.get("/usage/export.csv")) == []
    assert smollm2.name not in theirs.get("/usage/").content.decode()
    _, other_raw = api_key_create(user=other)
    other_client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=other_raw)
    assert other_client.get("/usage", cast_to=object)["data"] == []
