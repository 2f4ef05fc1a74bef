"""The account pages: sign in and out, optional sign-up, API keys (create once, revoke)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.factories import PASSWORD, UserFactory
from webapp.accounts.models import ApiKey, User
from webapp.accounts.services import api_key_create

pytestmark = pytest.mark.django_db


def _client(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_sign_in_and_sign_out_through_the_forms() -> None:
    """The sign-in form leads to the dashboard; signing out leads back to it."""
    user = UserFactory()
    client = Client()
    page = client.get("/accounts/login/").content.decode()
    assert 'for="id_username"' in page
    assert "Create an account" not in page  # sign-up is off by default
    response = client.post(
        "/accounts/login/", {"username": user.username, "password": PASSWORD}, follow=True
    )
    assert response.redirect_chain[-1][0] == "/"
    assert "Sign out" in response.content.decode()
    response = client.post("/accounts/logout/", follow=True)
    assert response.redirect_chain[-1][0] == "/accounts/login/"
    assert client.get("/").status_code == 302


def test_sign_up_is_off_unless_the_operator_enables_it(settings: Any) -> None:
    """Off: 404 and no link; on: an account is created and signed in."""
    settings.CARRY_ON = {**settings.CARRY_ON, "SIGNUP_ENABLED": False}
    assert Client().get("/accounts/signup/").status_code == 404
    settings.CARRY_ON = {**settings.CARRY_ON, "SIGNUP_ENABLED": True}
    client = Client()
    assert "Create an account" in client.get("/accounts/login/").content.decode()
    secret = "a long passphrase 42"
    response = client.post(
        "/accounts/signup/",
        {"username": "grace", "password1": secret, "password2": secret},
        follow=True,
    )
    assert response.redirect_chain[-1][0] == "/"
    user = User.objects.get(username="grace")
    assert user.check_password("a long passphrase 42")
    assert response.context["user"] == user


def test_sign_up_explains_what_is_wrong(settings: Any) -> None:
    """Mismatched or weak passwords and taken names are shown next to their fields."""
    settings.CARRY_ON = {**settings.CARRY_ON, "SIGNUP_ENABLED": True}
    UserFactory(username="taken")
    client = Client()
    cases = [
        ({"username": "x1", "password1": "a long passphrase 42", "password2": "other 42 xyz"},
         "The two passwords differ."),
        ({"username": "x2", "password1": "123", "password2": "123"}, "too short"),
        ({"username": "taken", "password1": "a long passphrase 42",
          "password2": "a long passphrase 42"}, "already exists"),
    ]  # fmt: skip
    for data, message in cases:
        response = client.post("/accounts/signup/", data)
        assert response.status_code == 400
        assert message in response.content.decode()
    assert not User.objects.filter(username__in=["x1", "x2"]).exists()


def test_api_key_is_shown_once_then_listed_by_prefix() -> None:
    """Creating a key shows it in that response only; the list shows its prefix."""
    user = UserFactory()
    client = _client(user)
    response = client.post("/accounts/keys/", {"name": "laptop"})
    key = ApiKey.objects.get(user=user)
    html = response.content.decode()
    raw = html.split('id="new-key-value" class="mono key-once" value="', 1)[1].split('"', 1)[0]
    assert raw.startswith(key.prefix)
    assert response["cache-control"] == "no-store"
    listing = client.get("/accounts/keys/").content.decode()
    assert raw not in listing
    assert f"{key.prefix}…" in listing
    assert "laptop" in listing
    assert "never" in listing


def test_revoking_a_key_stops_it_and_only_the_owner_can(tiny_base_model: Any) -> None:
    """The owner's revoke works at once; another user's attempt is a 404."""
    user = UserFactory()
    key, raw = api_key_create(user=user, name="ci")
    assert _client(UserFactory()).post(f"/accounts/keys/{key.pk}/revoke/").status_code == 404
    key.refresh_from_db()
    assert key.is_active
    response = _client(user).post(f"/accounts/keys/{key.pk}/revoke/", follow=True)
    assert "no longer works" in response.content.decode()
    key.refresh_from_db()
    assert not key.is_active
    denied = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert denied.status_code == 401
