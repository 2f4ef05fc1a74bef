"""Log-in throttling: repeated failures lock a (username, address) out, then it resets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client

from tests.factories import PASSWORD, UserFactory
from webapp.accounts import throttling

pytestmark = pytest.mark.django_db

LIMIT = 3
WINDOW = 600


@pytest.fixture(autouse=True)
def _small_limits(settings: Any) -> Iterator[None]:
    settings.CARRY_ON = {
        **settings.CARRY_ON,
        "LOGIN_MAX_FAILURES": LIMIT,
        "LOGIN_LOCKOUT_SECONDS": WINDOW,
        "TRUSTED_PROXIES": 0,
    }
    cache.clear()
    yield
    cache.clear()


def _login(username: str, password: str, address: str = "10.0.0.1", path: str = "") -> Any:
    client = Client(REMOTE_ADDR=address)
    return client.post(
        path or "/accounts/login/", {"username": username, "password": password}, follow=False
    )


def _fail(username: str, times: int, address: str = "10.0.0.1") -> None:
    for _ in range(times):
        assert _login(username, "wrong password", address).status_code == 200


def test_repeated_failures_lock_out_even_the_right_password() -> None:
    """After LIMIT failures the right password gets a 429 naming the wait, with Retry-After."""
    user = UserFactory()
    assert _login(user.username, PASSWORD).status_code == 302  # it works before
    _fail(user.username, LIMIT)
    response = _login(user.username, PASSWORD)
    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= WINDOW
    assert "Too many failed sign-in attempts" in response.content.decode()
    assert "_auth_user_id" not in response.client.session


def test_the_lockout_is_per_username_and_address() -> None:
    """Another address, or another user from the same address, is not locked out."""
    user, other = UserFactory(), UserFactory()
    _fail(user.username, LIMIT, address="10.0.0.1")
    assert _login(user.username, PASSWORD, address="10.0.0.2").status_code == 302
    assert _login(other.username, PASSWORD, address="10.0.0.1").status_code == 302


def test_spraying_usernames_from_one_address_is_locked_out_too() -> None:
    """Failures for many usernames from one address add up to the per-address limit."""
    user = UserFactory()
    limit = LIMIT * throttling.PER_ADDRESS_FACTOR
    for index in range(limit):
        _login(f"nobody{index}", "guess", address="10.0.0.9")
    assert _login(user.username, PASSWORD, address="10.0.0.9").status_code == 429
    assert _login(user.username, PASSWORD, address="10.0.0.8").status_code == 302


def test_the_lockout_ends_after_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the window has passed since the first failure, the right password works again."""
    user = UserFactory()
    start = throttling._now()
    monkeypatch.setattr(throttling, "_now", lambda: start)
    _fail(user.username, LIMIT)
    assert _login(user.username, PASSWORD).status_code == 429
    monkeypatch.setattr(throttling, "_now", lambda: start + WINDOW - 1)
    assert _login(user.username, PASSWORD).status_code == 429
    monkeypatch.setattr(throttling, "_now", lambda: start + WINDOW + 1)
    assert _login(user.username, PASSWORD).status_code == 302


def test_a_successful_log_in_resets_the_count() -> None:
    """Failures before a success do not add up with failures after it."""
    user = UserFactory()
    _fail(user.username, LIMIT - 1)
    assert _login(user.username, PASSWORD).status_code == 302
    _fail(user.username, LIMIT - 1)
    assert _login(user.username, PASSWORD).status_code == 302


def test_the_admin_log_in_is_throttled_as_well() -> None:
    """The lockout holds on every log-in path, the admin's included."""
    staff = UserFactory(is_staff=True)
    _fail(staff.username, LIMIT)
    response = _login(staff.username, PASSWORD, path="/admin/login/")
    assert response.status_code == 200  # the admin's own form, with an error
    assert "_auth_user_id" not in response.client.session


def test_the_client_address_honours_only_trusted_proxies(settings: Any) -> None:
    """X-Forwarded-For counts only as far as the configured proxies vouch for it."""
    from django.test import RequestFactory

    request = RequestFactory().get(
        "/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.7"
    )
    assert throttling.client_address(request) == "10.0.0.1"
    settings.CARRY_ON = {**settings.CARRY_ON, "TRUSTED_PROXIES": 1}
    assert throttling.client_address(request) == "203.0.113.7"  # the spoofable part ignored
