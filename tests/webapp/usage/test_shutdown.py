"""Nothing buffered is lost on a normal shutdown of a real server process."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from tests.factories import UserFactory
from webapp.accounts.services import api_key_create
from webapp.usage.models import UsageRecord

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_stopping_server_writes_its_buffered_usage(
    studio_server: Any, lively_base_model: Any
) -> None:
    """gunicorn stopped (SIGTERM) while a chat's record still waits for its next write (an
    hour away) writes it on the way out."""
    user = UserFactory()
    _, raw = api_key_create(user=user)
    server = studio_server(workers=1, CARRY_ON_USAGE_FLUSH_SECONDS="3600")
    reply = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "lively", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers={"Authorization": f"Bearer {raw}"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    time.sleep(0.5)
    assert not UsageRecord.objects.filter(user=user).exists()  # still in the buffer
    server.stop()
    assert server.proc.returncode == 0, server.tail()
    [record] = UsageRecord.objects.filter(user=user)
    assert record.completion_tokens == reply.json()["usage"]["completion_tokens"]
    assert "wrote 1 buffered record(s) at exit" in server.tail()
