"""The plan of a job (services/planning.py), run through the eager tasks on a tiny base:
splits, cached features, and data or bases that fail the job clearly."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError

from tests.factories import FileFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.eager_jobs import HYPER, TINY, create_job, run_job
from webapp.customizations.models import FeatureSet, FineTuningJob
from webapp.customizations.services import planning
from webapp.customizations.services.jobs import job_create
from workers import tasks

pytestmark = pytest.mark.django_db


def _count_calls(monkeypatch: Any, owner: Any, name: str) -> list[int]:
    """Wraps ``owner.<name>`` for this test; the list gains an entry per call."""
    calls: list[int] = []
    original = getattr(owner, name)

    def count(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, count)
    return calls


def test_second_job_on_same_file_and_base_skips_extraction(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """The cached feature sets are reused: the second job never runs the base or the embed task."""
    user = UserFactory()
    file = FileFactory(owner=user)
    first = run_job(django_capture_on_commit_callbacks, user=user, file=file)
    assert first.status == "succeeded"
    assert FeatureSet.objects.filter(status="ready").count() == 2  # train and held-out split

    def no_extraction(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("extraction ran for a cached dataset")

    monkeypatch.setattr(tasks, "_extract", no_extraction)
    second = run_job(django_capture_on_commit_callbacks, user=user, file=file, seed=4)
    assert second.status == "succeeded", second.error
    assert second.train_features_id == first.train_features_id
    assert second.valid_features_id == first.valid_features_id
    assert FeatureSet.objects.count() == 2
    assert second.events.filter(data__extraction_skipped=True).exists()


def test_bad_data_fails_the_job_with_a_clear_error(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """An example longer than the job's max_length fails validation, naming its line."""
    user = UserFactory()
    job = run_job(
        django_capture_on_commit_callbacks,
        user=user,
        file=FileFactory(owner=user),
        carry_on={**TINY, "max_length": 16},
    )
    assert job.status == "failed"
    assert job.error["code"] == "invalid_training_file"
    assert job.error["param"] == "training_file"
    assert "line 1:" in job.error["message"]
    assert "the limit is 16" in job.error["message"]


def test_incompatible_base_fails_the_job(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A base whose files no longer match its registered fingerprint is refused clearly."""
    tiny_base_model.fingerprint_key = "0" * 32
    tiny_base_model.save()
    user = UserFactory()
    job = run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "failed"
    assert job.error["code"] == "incompatible_base_model"
    assert "no longer match" in job.error["message"]


def test_transient_database_error_is_retried(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """An OperationalError releases the claim and the task is retried, then succeeds."""
    user = UserFactory()
    calls: list[int] = []
    original = tasks.job_validate_files

    def flaky(**kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        original(**kwargs)

    monkeypatch.setattr(tasks, "job_validate_files", flaky)
    job = run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert len(calls) == 2
    assert job.status == "succeeded", job.error


def test_validation_split_is_shared_by_jobs_with_different_seeds(tiny_base_model: Any) -> None:
    """The held-out split does not depend on the job's seed, so its features are reusable."""
    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(30))
    one = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file, seed=1)
    two = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file, seed=2)
    first, second = planning.job_splits(one), planning.job_splits(two)
    assert first.train_digest == second.train_digest
    assert [e.line for e in first.valid] == [e.line for e in second.valid]
    assert len(first.valid) == 3


def test_a_continued_job_whose_parent_was_deleted_fails_clearly(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, make_adapter: Any
) -> None:
    """The parent deleted between creation and training: the job fails naming it, instead of
    quietly training from scratch; the job keeps the parent's name."""
    from webapp.customizations.services.adapters import adapter_delete

    user = UserFactory()
    parent = make_adapter(user, tiny_base_model, seed=1)
    file = FileFactory(owner=user)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = job_create(user=user, training_file=file.id, model=parent.name, hyperparameters=HYPER)
    adapter_delete(adapter=parent)
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error is not None
    assert (job.error["code"], job.error["param"]) == ("parent_model_deleted", "model")
    assert parent.name in job.error["message"]
    assert (job.parent, job.parent_model) == (None, parent.name)


def test_validation_reuses_the_token_counts_measured_at_upload(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """A file uploaded with the job's base is not tokenized again to resolve max_length."""
    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))

    def tokenize_again(*args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError("the upload's token counts were not reused")

    monkeypatch.setattr(planning, "job_tokenize", tokenize_again)
    with django_capture_on_commit_callbacks(execute=False):
        job = create_job(user=user, file=file)
        tasks.validate_job_files.apply(args=[job.id])
    job.refresh_from_db()
    assert job.status == "queued"
    assert job.carry_on["max_length"] == file.max_example_tokens


def test_token_counts_of_another_tokenizer_are_not_reused(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """Counts measured before the base's tokenizer changed are ignored: it tokenizes again."""
    import os
    from pathlib import Path

    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))
    tokenizer = Path(tiny_base_model.path) / "tokenizer.json"
    stamp = tokenizer.stat()
    calls = _count_calls(monkeypatch, planning, "job_tokenize")
    try:
        os.utime(tokenizer, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))
        with django_capture_on_commit_callbacks(execute=False):
            job = create_job(user=user, file=file)
            tasks.validate_job_files.apply(args=[job.id])
    finally:
        os.utime(tokenizer, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    job.refresh_from_db()
    assert job.status == "queued"
    assert calls  # the training and validation splits were tokenized again


def _features(job: FineTuningJob) -> list[Any]:
    """Each split's cached examples: token ids, target mask and every stored state."""
    from customization.features import FeatureSet as CachedFeatures
    from webapp.core.utils import data_path

    rows = []
    for record in (job.train_features, job.valid_features):
        assert record is not None
        for example in CachedFeatures.open(data_path(record.path)).load().examples:
            states = [s.dequantize().tolist() for s in example.states]
            rows.append((example.input_ids.tolist(), example.target_mask.tolist(), states))
    return rows


def test_a_job_reuses_the_tokenization_of_the_upload(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """Validation and extraction both read the upload's stored tokens: the tokenizer never
    runs for the job, and the stored tokens equal a fresh tokenization."""
    from customization.tokenizer import ChatTokenizer

    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))
    job = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file)
    splits = planning.job_splits(job)
    fresh = planning.job_tokenize(job, splits.train, max_length=4096)
    assert planning.job_tokenized(job, splits.train, part="train", max_length=4096) == fresh
    calls = _count_calls(monkeypatch, ChatTokenizer, "encode_chat")
    job = run_job(django_capture_on_commit_callbacks, user=user, file=file)
    assert job.status == "succeeded", job.error
    assert calls == []


def test_a_mismatched_tokenization_is_tokenized_again_with_the_same_features(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """Without a usable stored tokenization (here removed) extraction tokenizes again, and
    the job's features are identical to those of a job that reused the stored one."""
    from webapp.core.utils import data_path
    from webapp.customizations.artifacts import upload_tokens_path

    reused_user, fresh_user = UserFactory(), UserFactory()  # features are cached per owner
    reused_file = FileFactory(owner=reused_user, content=toy_jsonl(12))
    fresh_file = FileFactory(owner=fresh_user, content=toy_jsonl(12))
    data_path(upload_tokens_path(fresh_file.path)).unlink()
    reused = run_job(django_capture_on_commit_callbacks, user=reused_user, file=reused_file)
    calls = _count_calls(monkeypatch, planning, "job_tokenize")
    fresh = run_job(django_capture_on_commit_callbacks, user=fresh_user, file=fresh_file)
    assert (reused.status, fresh.status) == ("succeeded", "succeeded")
    assert len(calls) == 4  # validation and extraction, each for both splits
    assert reused.train_features_id != fresh.train_features_id
    assert _features(reused) == _features(fresh)


def test_a_shorter_max_length_than_the_stored_examples_tokenizes_again(
    tiny_base_model: Any,
) -> None:
    """A job whose max_length cuts a stored example does not reuse the stored tokens: it
    tokenizes again, which names the line that does not fit."""
    from customization.errors import DatasetFormatError

    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))
    job = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file)
    splits = planning.job_splits(job)
    with pytest.raises(DatasetFormatError, match="the limit is 8"):
        planning.job_tokenized(job, splits.train, part="train", max_length=8)


def test_damaged_stored_token_ids_are_tokenized_again(
    tiny_base_model: Any, monkeypatch: Any
) -> None:
    """Stored ids that no longer decode are not trusted: the examples are tokenized again."""
    import json

    from webapp.core.utils import data_path
    from webapp.customizations.artifacts import upload_tokens_path

    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))
    sidecar = data_path(upload_tokens_path(file.path))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "ids": "AAAA"}))
    job = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file)
    splits = planning.job_splits(job)
    original = planning.job_tokenize
    calls = _count_calls(monkeypatch, planning, "job_tokenize")
    tokenized = planning.job_tokenized(job, splits.train, part="train", max_length=4096)
    assert calls == [1]
    assert tokenized == original(job, splits.train, max_length=4096)
