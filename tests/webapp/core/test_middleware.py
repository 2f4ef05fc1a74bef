"""Guards in front of every view: body size before reading, CSRF on session requests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.factories import UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.webapp.api.conftest import bearer_client

pytestmark = pytest.mark.django_db

FIFTY_MB = 50 * 1024 * 1024


class UnreadableBody(io.RawIOBase):
    """A request body that records any attempt to read it."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        return b"x" * (size if 0 < size < 65536 else 65536)

    def readline(self, size: int | None = -1) -> bytes:
        return self.read(size or -1)


def _declared_post(client: Client, path: str, length: int, **extra: Any) -> tuple[Any, int]:
    body = UnreadableBody()
    response = client.post(
        path,
        content_type="multipart/form-data; boundary=xyz",
        **{"wsgi.input": body, "CONTENT_LENGTH": str(length), **extra},
    )
    return response, body.reads


@pytest.mark.parametrize(
    "path", ["/", "/files/", "/accounts/login/", "/accounts/signup/", "/nowhere/"]
)
def test_a_50_mb_post_to_a_page_without_a_session_is_refused_unread(
    path: str, settings: Any, tmp_path: Path
) -> None:
    """413 before a byte of the body is read, and no temporary upload file is written."""
    spool = tmp_path / "spool"
    spool.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(spool)
    response, reads = _declared_post(Client(), path, FIFTY_MB)
    assert response.status_code == 413
    assert reads == 0
    assert list(spool.iterdir()) == []


def test_an_anonymous_upload_to_the_api_is_held_to_the_small_limit() -> None:
    """Without a valid key or session, /v1/files takes no more than an ordinary body."""
    response, reads = _declared_post(Client(), "/v1/files", 3 * 1024 * 1024)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert reads == 0
    response, reads = _declared_post(
        Client(), "/v1/files", 3 * 1024 * 1024, HTTP_AUTHORIZATION="Bearer sk-co-made-up"
    )
    assert response.status_code == 413
    assert reads == 0


def test_signed_in_uploads_keep_the_upload_limit(tiny_base_model: Any) -> None:
    """A 3 MB upload (over the ordinary body limit) passes for a key and a session."""
    data = toy_jsonl(4) * (3 * 1024 * 1024 // len(toy_jsonl(4)) + 1)
    api = bearer_client(UserFactory())
    response = api.post("/v1/files", {"file": io.BytesIO(data), "purpose": "fine-tune"})
    assert response.status_code == 200, response.content
    client = Client()
    client.force_login(UserFactory())
    page = client.post("/files/", {"file": io.BytesIO(data)}, HTTP_ACCEPT="application/json")
    assert page.status_code == 200, page.content


def test_a_cross_site_post_to_a_page_is_refused() -> None:
    """With CSRF checks on, a signed-in page POST without the token, or from another
    origin even with it, is 403."""
    user = UserFactory()
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post("/accounts/keys/", {"name": "x"}).status_code == 403
    client.get("/accounts/keys/")
    form = {"name": "x", "csrfmiddlewaretoken": client.cookies["csrftoken"].value}
    for origin, status in (("https://evil.example", 403), ("http://localhost", 200)):
        posted = client.post("/accounts/keys/", form, HTTP_ORIGIN=origin, HTTP_HOST="localhost")
        assert posted.status_code == status, origin


def test_a_cross_site_session_call_to_the_api_is_refused(tiny_base_model: Any) -> None:
    """A /v1 call authenticated by the browser session needs the CSRF token (403 without);
    a bearer key needs none."""
    user = UserFactory()
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    refused = client.post("/v1/chat/completions", chat, content_type="application/json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["error"]["message"]
    refused = client.post("/v1/files", {"file": io.BytesIO(b"{}"), "purpose": "fine-tune"})
    assert refused.status_code == 403
    api = bearer_client(user)
    assert api.post("/v1/chat/completions", chat, format="json").status_code == 200
