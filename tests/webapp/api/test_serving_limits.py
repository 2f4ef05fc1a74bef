"""Chat serving under hostile use: long stops, clients that leave, one user holding slots."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from tests.factories import UserFactory
from tests.webapp.api.conftest import bearer_client

pytestmark = pytest.mark.django_db

HELLO = [{"role": "user", "content": "tell me a story about rivers"}]
REPO = Path(__file__).resolve().parents[3]


def _chat(api: Any, **body: Any) -> Any:
    return api.post("/v1/chat/completions", {"messages": HELLO, **body}, format="json")


@pytest.mark.parametrize("stop", ["s" * 100_000, ["ok", "s" * 100_000], ["t" * 1001] * 4])
def test_a_stop_longer_than_the_cap_is_refused_naming_stop(api: Any, stop: Any) -> None:
    """A 100,000-character stop (alone or in a list) is a 400 whose param is ``stop``."""
    response = _chat(api, model="anything", stop=stop)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == "stop"
    assert "1000 characters" in error["message"]


def _decoded_rows(api: Any, connection: socket.socket) -> tuple[Any, int]:
    """Rows the engine decoded for one non-streamed chat sent over ``connection``."""
    from webapp.serving.services import engine_counters

    before = engine_counters("tiny")["decode_rows"]
    response = api.post(
        "/v1/chat/completions",
        {"messages": HELLO, "model": "tiny", "temperature": 0, "max_tokens": 150},
        format="json",
        **{"gunicorn.socket": connection},
    )
    return response, engine_counters("tiny")["decode_rows"] - before


def test_a_non_streamed_chat_stops_decoding_when_its_client_leaves(
    api: Any, tiny_base_model: Any
) -> None:
    """The client's socket closed: the engine drops the sequence at once (counters), while a
    connected client's chat of the same size decodes to the end (the tiny base never stops
    by itself)."""
    _chat(api, model="tiny", max_tokens=1)  # loads the base
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        connected, full = _decoded_rows(api, server_side)
    assert connected.status_code == 200, connected.content
    server_side, client_side = socket.socketpair()
    with server_side:
        client_side.close()
        gone, cut = _decoded_rows(api, server_side)
    assert gone.status_code == 499
    assert full == 149, full  # max_tokens, less the token the prefill makes
    assert cut <= 3, (cut, full)


def test_one_user_holds_at_most_its_share_of_the_serving_slots(
    settings: Any, lively_base_model: Any
) -> None:
    """Past SERVING_MAX_PER_USER in-flight choices a user gets 429 naming the limit; another
    user is still served, and the slots come back when a completion ends."""
    from webapp.serving.services import ChatRequest, chat_completion_submit, user_slots

    settings.CARRY_ON = {**settings.CARRY_ON, "SERVING_MAX_PER_USER": 2}
    greedy, other = UserFactory(), UserFactory()
    request = ChatRequest(model="lively", messages=HELLO, max_tokens=4, n=2)
    held = chat_completion_submit(user=greedy, request=request)
    burst = bearer_client(greedy).post(
        "/v1/chat/completions", {"messages": HELLO, "model": "lively"}, format="json"
    )
    assert burst.status_code == 429, burst.content
    assert burst.json()["error"]["code"] == "user_concurrency_limit"
    assert "CARRY_ON_SERVING_MAX_PER_USER" in burst.json()["error"]["message"]
    answered = bearer_client(other).post(
        "/v1/chat/completions", {"messages": HELLO, "model": "lively", "max_tokens": 2},
        format="json",
    )  # fmt: skip
    assert answered.status_code == 200, answered.content
    held.completion.result()
    assert user_slots.held(greedy) == 0
    again = chat_completion_submit(user=greedy, request=request)
    again.completion.cancel()
    assert user_slots.held(greedy) == 0


def test_the_readme_web_server_has_more_threads_than_serving_slots() -> None:
    """The README's gunicorn line runs more threads per process than SERVING_MAX_PENDING, so a
    chat past the slots gets 429 while threads are still free for every other request."""
    readme = (REPO / "README.md").read_text("utf-8")
    [line] = [row for row in readme.splitlines() if "gunicorn webapp.wsgi" in row]
    threads = int(re.search(r"--threads (\d+)", line).group(1))  # type: ignore[union-attr]
    assert int(django_settings.CARRY_ON["SERVING_MAX_PENDING"]) < threads
    assert "CARRY_ON_SERVING_MAX_PENDING" in line
