"""The per-username log-in limit holds across addresses; sign-up log-ins take no place."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client

from tests.factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _limits(settings: Any) -> Iterator[None]:
    settings.CARRY_ON = {
        **settings.CARRY_ON,
        "LOGIN_MAX_FAILURES": 3,
        "LOGIN_MAX_FAILURES_PER_USERNAME": 4,
        "TRUSTED_PROXIES": 0,
    }
    cache.clear()
    yield
    cache.clear()


def _login(username: str, password: str, address: str) -> int:
    response = Client(REMOTE_ADDR=address).post(
        "/accounts/login/", {"username": username, "password": password}
    )
    return response.status_code


def test_guessing_one_password_from_many_addresses_is_locked_out() -> None:
    """LOGIN_MAX_FAILURES_PER_USERNAME failures from as many addresses lock the username out
    everywhere, even with the right password from a fresh address."""
    user = UserFactory()
    assert [_login(user.username, "guess", f"10.2.0.{i}") for i in range(4)] == [200] * 4
    assert _login(user.username, PASSWORD, "10.2.0.99") == 429


def test_successful_log_ins_never_add_up_to_a_lockout(settings: Any) -> None:
    """Successful log-ins give their places back: twelve from one address pass a
    per-address limit of ten."""
    settings.CARRY_ON = {**settings.CARRY_ON, "LOGIN_MAX_FAILURES": 1}
    users = [UserFactory() for _ in range(6)]
    for user in users * 2:
        assert _login(user.username, PASSWORD, "10.3.0.1") == 302
