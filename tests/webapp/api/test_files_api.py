"""/v1/files: upload with validation at upload time, list, retrieve, content, delete."""

from __future__ import annotations

import io
from typing import Any

import pytest

from tests.factories import FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.customizations.models import File

pytestmark = pytest.mark.django_db


def _upload(api: Any, data: bytes, name: str = "train.jsonl", purpose: str = "fine-tune") -> Any:
    return api.post("/v1/files", {"file": io.BytesIO(data), "purpose": purpose}, format="multipart")


def test_upload_returns_an_openai_file_object(api: Any, lively_base_model: Any) -> None:
    """A valid upload is stored, validated and described like OpenAI's FileObject."""
    response = _upload(api, toy_jsonl(8))
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["status"] == "processed"
    assert body["purpose"] == "fine-tune"
    assert body["bytes"] == len(toy_jsonl(8))
    assert body["n_examples"] == 8
    assert body["n_tokens"] > 0


def test_malformed_upload_is_refused_naming_its_lines_and_nothing_is_kept(
    api: Any, lively_base_model: Any
) -> None:
    """A dataset with bad lines answers 400 (param file) naming each line; no File remains."""
    data = toy_jsonl(3) + b'{"messages": [{"role": "robot", "content": "x"}]}\n{oops\n'
    response = _upload(api, data)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file"
    assert error["code"] == "invalid_training_file"
    assert "line 4" in error["message"]
    assert "line 5" in error["message"]
    assert not File.objects.exists()


def test_upload_needs_a_known_purpose(api: Any, lively_base_model: Any) -> None:
    """An unknown purpose is a 400 naming the purpose parameter."""
    response = _upload(api, toy_jsonl(2), purpose="assistants")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_oversized_upload_is_refused_with_413(
    api: Any, settings: Any, lively_base_model: Any
) -> None:
    """A file above the upload limit answers 413 before it is stored."""
    settings.CARRY_ON_MAX_UPLOAD_BYTES = 100
    response = _upload(api, toy_jsonl(40))
    assert response.status_code == 413
    assert response.json()["error"]["code"] in ("request_too_large", "file_too_large")
    assert not File.objects.exists()


def test_files_are_listed_newest_first_with_cursor_pagination(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """limit/after page through the caller's files; has_more says when to stop."""
    ids = [_upload(api, toy_jsonl(2, seed=i)).json()["id"] for i in range(3)]
    FileFactory(owner=UserFactory())  # someone else's: never listed
    first = api.get("/v1/files?limit=2").json()
    assert first["object"] == "list"
    assert [f["id"] for f in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    second = api.get(f"/v1/files?limit=2&after={first['last_id']}").json()
    assert [f["id"] for f in second["data"]] == [ids[0]]
    assert second["has_more"] is False


def test_file_content_is_returned_byte_for_byte(api: Any, lively_base_model: Any) -> None:
    """GET .../content returns exactly the uploaded bytes."""
    data = toy_jsonl(5)
    file_id = _upload(api, data).json()["id"]
    response = api.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200
    assert (
        b"".join(response.streaming_content if response.streaming else [response.content]) == data
    )


def test_delete_removes_the_file(api: Any, lively_base_model: Any) -> None:
    """DELETE answers OpenAI's deletion object; the file is gone afterwards."""
    file_id = _upload(api, toy_jsonl(2)).json()["id"]
    response = api.delete(f"/v1/files/{file_id}")
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert api.get(f"/v1/files/{file_id}").status_code == 404


def test_a_file_used_by_an_active_job_cannot_be_deleted(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """Deleting a file a queued job still needs is a 409 conflict, and nothing is lost."""
    job = FineTuningJobFactory(owner=user, status="queued")
    response = api.delete(f"/v1/files/{job.training_file_id}")
    assert response.status_code == 409
    assert File.objects.filter(pk=job.training_file_id).exists()
