"""Limits that must hold across real server processes (gunicorn), sharing Redis and a base."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.factories import PASSWORD, UserFactory
from tests.helpers.servers import StudioServer
from tests.helpers.services import service_missing
from webapp.accounts.services import api_key_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

LIMIT = 3
# A stream that outlasts the test: at temperature 2 the end-of-text token is about as
# likely as any other, so it does not end by itself within thousands of tokens.
LONG_STREAM = {"max_tokens": 4000, "stream": True, "temperature": 2.0}


def _redis_cache_url() -> str:
    """A Redis database of its own for this test's counters (skipped without Redis)."""
    import redis

    url = os.environ.get("CARRY_ON_TEST_CACHE_URL", "redis://127.0.0.1:6379/13")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).flushdb()
    except redis.exceptions.ConnectionError:
        service_missing(f"needs Redis at {url} (CARRY_ON_TEST_CACHE_URL)")
    return url


def _login_form(server: StudioServer) -> tuple[dict[str, str], str]:
    """The CSRF cookie and token of a sign-in form (valid on every process: one secret)."""
    page = requests.get(f"{server.url}/accounts/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None, page.text[:500]
    return {"csrftoken": page.cookies["csrftoken"]}, token.group(1)


def _attempt(server: StudioServer, cookies: dict[str, str], token: str, username: str,
             password: str) -> int:  # fmt: skip
    response = requests.post(
        f"{server.url}/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
        cookies=cookies, allow_redirects=False, timeout=60,
    )  # fmt: skip
    return response.status_code


def test_a_parallel_password_burst_on_two_processes_is_checked_exactly_the_limit(
    studio_server: Callable[..., StudioServer],
) -> None:
    """Twelve wrong passwords at once, split over two servers sharing Redis: exactly LIMIT
    are checked (200, the form again), the rest are refused (429); then the right password
    is refused on both."""
    cache_url = _redis_cache_url()
    env = {"CARRY_ON_CACHE_URL": cache_url, "CARRY_ON_LOGIN_MAX_FAILURES": str(LIMIT)}
    servers = [studio_server(workers=1, **env), studio_server(workers=1, **env)]
    user = UserFactory()
    cookies, token = _login_form(servers[0])
    with ThreadPoolExecutor(12) as pool:
        statuses = list(
            pool.map(
                lambda i: _attempt(servers[i % 2], cookies, token, user.username, f"wrong{i}"),
                range(12),
            )
        )
    assert sorted(statuses) == [200] * LIMIT + [429] * (12 - LIMIT), statuses
    for server in servers:
        assert _attempt(server, cookies, token, user.username, PASSWORD) == 429


def test_one_users_burst_leaves_another_users_chat_answered(
    smollm2: Any, studio_server: Callable[..., StudioServer]
) -> None:
    """User A holds its share of the serving slots with two long streams; A's next chat is
    429 naming the per-user limit, while user B's chat on the same process is answered."""
    server = studio_server(
        workers=1, threads=8,
        CARRY_ON_SERVING_MAX_PENDING="4", CARRY_ON_SERVING_MAX_PER_USER="2",
    )  # fmt: skip
    keys = [api_key_create(user=UserFactory())[1] for _ in range(2)]
    headers = [{"Authorization": f"Bearer {key}"} for key in keys]
    url = f"{server.url}/v1/chat/completions"
    ask = {"model": smollm2.name, "messages": [{"role": "user", "content": "Tell a long story."}]}
    warm = requests.post(url, json={**ask, "max_tokens": 1}, headers=headers[1], timeout=300)
    assert warm.status_code == 200, warm.text  # the base is loaded
    streams = []
    try:
        for _ in range(2):
            stream = requests.post(
                url, json={**ask, **LONG_STREAM}, headers=headers[0],
                stream=True, timeout=60,
            )  # fmt: skip
            assert stream.status_code == 200, stream.text
            next(stream.iter_lines())  # admitted and decoding
            streams.append(stream)
        refused = requests.post(url, json={**ask, "max_tokens": 1}, headers=headers[0], timeout=60)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "user_concurrency_limit"
        assert "CARRY_ON_SERVING_MAX_PER_USER" in error["message"]
        assert refused.headers["retry-after"]
        answered = requests.post(
            url, json={**ask, "max_tokens": 4}, headers=headers[1], timeout=120
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["message"]["content"]
    finally:
        for stream in streams:
            stream.close()


def test_a_chat_past_the_serving_slots_gets_429_while_threads_remain(
    smollm2: Any, studio_server: Callable[..., StudioServer]
) -> None:
    """With fewer slots than threads (as the README's gunicorn line has it), a chat past the
    slots is answered 429 at once, and other requests are still served meanwhile."""
    server = studio_server(workers=1, threads=4, CARRY_ON_SERVING_MAX_PENDING="2")
    headers = {"Authorization": f"Bearer {api_key_create(user=UserFactory())[1]}"}
    url = f"{server.url}/v1/chat/completions"
    ask = {"model": smollm2.name, "messages": [{"role": "user", "content": "Tell a long story."}]}
    warm = requests.post(url, json={**ask, "max_tokens": 1}, headers=headers, timeout=300)
    assert warm.status_code == 200, warm.text
    streams = []
    try:
        for _ in range(2):
            stream = requests.post(
                url, json={**ask, **LONG_STREAM}, headers=headers,
                stream=True, timeout=60,
            )  # fmt: skip
            assert stream.status_code == 200, stream.text
            next(stream.iter_lines())
            streams.append(stream)
        refused = requests.post(url, json={**ask, "max_tokens": 1}, headers=headers, timeout=60)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "engine_overloaded"
        assert requests.get(f"{server.url}/v1/models", headers=headers, timeout=60).ok
        assert requests.get(f"{server.url}/healthz", timeout=60).ok
    finally:
        for stream in streams:
            stream.close()
