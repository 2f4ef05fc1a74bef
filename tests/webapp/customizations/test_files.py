from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.factories import FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.core.exceptions import ConflictError, PayloadTooLargeError
from webapp.core.utils import data_path
from webapp.customizations.models import FeatureSet, File
from webapp.customizations.services.files import (
    file_create,
    file_delete,
    file_tokenization,
)

pytestmark = pytest.mark.django_db

MALFORMED = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    b"not json at all\n"
    b"\n"
    b'{"messages": [{"role": "user", "content": "only a question"}]}\n'
)


def _upload(user: Any, content: bytes, name: str = "data.jsonl") -> File:
    return file_create(user=user, upload=SimpleUploadedFile(name, content))


def test_valid_upload_is_processed_with_counts(tiny_base_model: Any) -> None:
    """A valid file is stored under its id with format, example and token counts."""
    file = _upload(UserFactory(), toy_jsonl(5))
    assert file.status == "processed"
    assert file.format == "chat"
    assert file.n_examples == 5
    assert file.n_tokens > 0
    assert file.max_example_tokens > 0
    assert file.report["ok"]
    assert file.report["tokenizer"] == "tiny"
    assert data_path(file.path).read_bytes() == toy_jsonl(5)


def test_upload_keeps_its_tokenization_for_the_default_base(tiny_base_model: Any) -> None:
    """The stored tokens of every example equal tokenizing it with the base, line by line."""
    from customization.datasets import load_dataset
    from customization.tokenizer import tokenize_examples
    from webapp.customizations.selectors import base_tokenizer

    file = _upload(UserFactory(), toy_jsonl(5))
    stored = file_tokenization(file=file, base=tiny_base_model)
    assert stored is not None
    fresh = tokenize_examples(
        load_dataset(toy_jsonl(5)), base_tokenizer(tiny_base_model), max_length=4096
    )
    assert stored.examples([t.line for t in fresh]) == fresh
    assert [stored.length(t.line) for t in fresh] == [len(t.input_ids) for t in fresh]
    assert stored.examples([1, 99]) is None  # line 99 holds no example


def test_stored_tokenization_keeps_ids_of_any_size(tiny_base_model: Any) -> None:
    """Token ids past 16 bits and masks with several target spans round-trip exactly."""
    from customization.tokenizer import TokenizedExample
    from webapp.customizations.services import files

    file = _upload(UserFactory(), toy_jsonl(2))
    examples = [
        TokenizedExample([5, 70_000, 2**31, 7, 8], [0, 1, 1, 0, 1], line=1),
        TokenizedExample([1, 2], [0, 1], line=3),
    ]
    files._write_tokenization(
        file.path, tiny_base_model, examples, max_length=16, within_bytes=1 << 20
    )
    stored = file_tokenization(file=file, base=tiny_base_model)
    assert stored is not None
    assert stored.id_bytes == 4
    assert stored.examples([1, 3]) == examples


def test_a_tokenization_larger_than_its_upload_allows_is_not_kept(tiny_base_model: Any) -> None:
    """The quota counts uploads only, so the stored tokenization is bounded by the upload's
    size; past it nothing is kept and a job tokenizes instead."""
    from customization.tokenizer import TokenizedExample
    from webapp.customizations.artifacts import upload_tokens_path
    from webapp.customizations.services import files

    file = _upload(UserFactory(), toy_jsonl(2))
    data_path(upload_tokens_path(file.path)).unlink()
    examples = [TokenizedExample(list(range(400)), [1] * 400, line=1)]
    files._write_tokenization(file.path, tiny_base_model, examples, max_length=512, within_bytes=64)
    assert not data_path(upload_tokens_path(file.path)).exists()
    assert file_tokenization(file=file, base=tiny_base_model) is None


def test_malformed_upload_reports_each_problem_with_its_line(tiny_base_model: Any) -> None:
    """Every problem is listed with its 1-based line; the file is kept with status error."""
    file = _upload(UserFactory(), MALFORMED)
    assert file.status == "error"
    lines = [problem["line"] for problem in file.problems]
    assert lines == [2, 4]
    assert "invalid JSON" in file.problems[0]["message"]
    assert file.n_examples == 1


def test_over_long_example_is_reported_with_its_line(tiny_base_model: Any, settings: Any) -> None:
    """An example above the token limit (in the default base's tokens) names its line."""
    settings.CARRY_ON = {**settings.CARRY_ON, "MAX_EXAMPLE_TOKENS": 40}
    long = json.dumps({"prompt": "x" * 100, "completion": "y"}).encode()
    short = json.dumps({"prompt": "a", "completion": "b"}).encode()
    file = _upload(UserFactory(), short + b"\n" + long + b"\n")
    assert file.status == "error"
    assert [p["line"] for p in file.problems] == [2]
    assert "the limit is 40" in file.problems[0]["message"]


def test_upload_over_the_size_limit_is_refused_with_413(settings: Any) -> None:
    """A file above the byte limit is refused before anything is stored."""
    settings.CARRY_ON_MAX_UPLOAD_BYTES = 100
    with pytest.raises(PayloadTooLargeError) as caught:
        _upload(UserFactory(), toy_jsonl(20))
    assert caught.value.status == 413
    assert not File.objects.exists()


def test_uploaded_name_is_never_used_as_a_path(tiny_base_model: Any, data_dir: Path) -> None:
    """A hostile file name is kept for display only; the content lands under files/<id>."""
    file = _upload(UserFactory(), toy_jsonl(2), name="../../etc/passwd\x00.jsonl")
    assert file.filename == "passwd.jsonl"
    assert file.path == f"files/{file.id}.jsonl"
    names = sorted(p.name for p in (data_dir / "files").iterdir())
    assert names == [f"{file.id}.jsonl", f"{file.id}.tokens.json"]  # the upload, its tokens


def test_file_delete_removes_content_and_derived_features(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Deleting the last copy of a dataset removes its content, tokenization and features."""
    file = FileFactory()
    features = data_path("features/abc")
    features.mkdir(parents=True)
    FeatureSet.objects.create(
        key="abc", base=tiny_base_model, dataset_sha256=f"{file.sha256}:train", path="features/abc"
    )
    with django_capture_on_commit_callbacks(execute=True):
        file_delete(file=file)
    assert not File.objects.exists()
    assert not FeatureSet.objects.exists()
    assert not data_path(file.path).exists()
    assert not data_path(f"files/{file.id}.tokens.json").exists()
    assert not features.exists()


def test_file_used_by_an_active_job_cannot_be_deleted(tiny_base_model: Any) -> None:
    """A file under an unfinished job is refused with 409."""
    job = FineTuningJobFactory(status="running")
    with pytest.raises(ConflictError):
        file_delete(file=job.training_file)
    assert File.objects.filter(pk=job.training_file_id).exists()
