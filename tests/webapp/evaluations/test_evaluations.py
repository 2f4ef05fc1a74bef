"""Evaluations end to end in-process (eager Celery): figures per model, equal to the CLI's
``eval``; failures recorded with their error; cancel; per-user limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.factories import FileFactory, UserFactory, folder_base
from webapp.core.exceptions import ApplicationError, ConflictError, NotFoundError
from webapp.core.utils import data_path
from webapp.evaluations.models import Evaluation
from webapp.evaluations.services import evaluation_cancel, evaluation_create

pytestmark = pytest.mark.django_db

OPTIONS = {"limit": 5, "max_length": 512, "exact_match": 2, "max_tokens": 6}


def _cli_eval(
    base: Any, file: Any, adapter: Any, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    from customization import cli

    capsys.readouterr()
    argv = ["eval", str(data_path(file.path)), "--base", base.path]
    if adapter is not None:
        argv += ["--adapter", str(data_path(adapter.path))]
    for option, value in OPTIONS.items():
        argv += [f"--{option.replace('_', '-')}", str(value)]
    assert cli.main(argv) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_an_evaluation_scores_every_model_as_the_cli_eval_does(
    user: Any,
    tiny_base_model: Any,
    held_out: Any,
    two_adapters: list[Any],
    django_capture_on_commit_callbacks: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Base and two adapters: loss, token accuracy and exact match per model, each equal to
    `python -m customization eval` on the same file with the same options."""
    models = [tiny_base_model.name, *(a.name for a in two_adapters)]
    with django_capture_on_commit_callbacks(execute=True):
        evaluation = evaluation_create(user=user, file=held_out.id, models=models, **OPTIONS)
    evaluation.refresh_from_db()
    assert evaluation.status == Evaluation.Status.SUCCEEDED, evaluation.error
    assert (evaluation.n_examples, evaluation.n_problems, evaluation.progress) == (5, 2, 1.0)
    assert [p["line"] for p in evaluation.problems] == [1, 2]
    results = list(evaluation.results.order_by("position"))
    assert [r.model for r in results] == models
    assert [r.kind for r in results] == ["base", "adapter", "adapter"]
    for result, adapter in zip(results, [None, *two_adapters], strict=True):
        cli = _cli_eval(tiny_base_model, held_out, adapter, capsys)
        assert result.loss == pytest.approx(cli["loss"], rel=1e-6)
        assert result.token_accuracy == pytest.approx(cli["token_accuracy"], rel=1e-6)
        assert result.exact_match == cli["exact_match"]
        assert cli["exact_match_problems"] == len(result.samples) == 2
        assert result.n_correct == sum(s["correct"] for s in result.samples)
    assert len({r.loss for r in results}) == 3  # the adapters do change the model


def test_a_missing_artifact_fails_the_evaluation_naming_the_model(
    user: Any,
    tiny_base_model: Any,
    held_out: Any,
    two_adapters: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Nothing is lost: the failure is recorded on the evaluation, with its error."""
    import shutil

    broken = two_adapters[1]
    shutil.rmtree(data_path(broken.path))
    with django_capture_on_commit_callbacks(execute=True):
        evaluation = evaluation_create(
            user=user, file=held_out.id, models=[tiny_base_model.name, broken.name], **OPTIONS
        )
    evaluation.refresh_from_db()
    assert evaluation.status == Evaluation.Status.FAILED
    assert evaluation.error["param"] == "models"
    assert evaluation.error["message"].startswith(f"{broken.name}: ")
    assert evaluation.finished_at is not None


def test_a_deleted_file_fails_the_evaluation_naming_file(
    user: Any, tiny_base_model: Any, held_out: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A held-out file removed before the worker reads it fails the evaluation clearly."""
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        evaluation = evaluation_create(user=user, file=held_out.id, models=["tiny"], **OPTIONS)
    Path(data_path(held_out.path)).unlink()
    for callback in callbacks:
        callback()
    evaluation.refresh_from_db()
    assert evaluation.status == Evaluation.Status.FAILED
    assert (evaluation.error["code"], evaluation.error["param"]) == ("file_missing", None)


def test_cancel_stops_a_queued_evaluation_and_refuses_a_finished_one(
    user: Any, tiny_base_model: Any, held_out: Any
) -> None:
    """Cancelled once (a worker that claims it later finds nothing to do); then 409."""
    from webapp.evaluations.services import evaluation_claim

    evaluation = evaluation_create(user=user, file=held_out.id, models=["tiny"])
    evaluation_cancel(evaluation=evaluation)
    assert evaluation.status == Evaluation.Status.CANCELLED
    assert evaluation_claim(evaluation_id=evaluation.id, worker="w") is None
    with pytest.raises(ConflictError):
        evaluation_cancel(evaluation=evaluation)


def test_defaults_are_the_cli_defaults_within_the_operator_caps(
    user: Any, tiny_base_model: Any, held_out: Any, settings: Any
) -> None:
    """No options: every example, 512 tokens, 16 problems, 256 new tokens (capped)."""
    settings.CARRY_ON = {**settings.CARRY_ON, "EVALUATION_MAX_PROBLEMS": 4}
    evaluation = evaluation_create(user=user, file=held_out, models=["tiny"])
    assert (evaluation.limit, evaluation.max_length) == (6, 512)
    assert (evaluation.exact_match, evaluation.max_tokens) == (4, 256)


@pytest.mark.parametrize(
    ("change", "status", "param", "code"),
    [
        ({"models": ["no-such-model"]}, 404, "models", "not_found"),
        ({"models": "tiny"}, 400, "models", "invalid_value"),
        ({"models": []}, 400, "models", "invalid_value"),
        ({"models": ["tiny", "tiny"]}, 400, "models", "invalid_value"),
        ({"models": ["tiny"] * 9}, 400, "models", "option_above_limit"),
        ({"file": "file-missing"}, 400, "file", "invalid_file"),
        ({"limit": 0}, 400, "limit", "invalid_value"),
        ({"limit": "5"}, 400, "limit", "invalid_value"),
        ({"exact_match": 65}, 400, "exact_match", "option_above_limit"),
        ({"max_tokens": 100_000}, 400, "max_tokens", "option_above_limit"),
        ({"max_length": 4}, 400, "max_length", "invalid_value"),
    ],
)
def test_bad_requests_are_refused_naming_the_parameter(
    user: Any, tiny_base_model: Any, held_out: Any, change: dict[str, Any], status: int,
    param: str, code: str,
) -> None:  # fmt: skip
    """Each bad value is refused before anything is created, naming its parameter."""
    request = {"file": held_out.id, "models": ["tiny"], **change}
    with pytest.raises(ApplicationError) as refused:
        evaluation_create(user=user, **request)
    error = refused.value
    assert (error.status, error.param, error.code) == (status, param, code)
    assert not Evaluation.objects.exists()


def test_another_users_adapter_and_file_are_not_found(
    user: Any, tiny_base_model: Any, held_out: Any, make_adapter: Any
) -> None:
    """Another user's adapter reads as missing (404 naming models), their file as invalid."""
    other = UserFactory()
    theirs = make_adapter(other, tiny_base_model, seed=3)
    with pytest.raises(NotFoundError) as refused:
        evaluation_create(user=user, file=held_out.id, models=["tiny", theirs.name])
    assert refused.value.param == "models"
    assert theirs.name in refused.value.message
    their_file = FileFactory(owner=other)
    with pytest.raises(ApplicationError) as refused:
        evaluation_create(user=user, file=their_file.id, models=["tiny"])
    assert (refused.value.status, refused.value.param) == (400, "file")


def test_an_empty_or_invalid_file_is_refused(user: Any, tiny_base_model: Any) -> None:
    """A file that did not pass validation (here: empty) cannot be evaluated on."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from webapp.customizations.services.files import file_create

    empty = file_create(user=user, upload=SimpleUploadedFile("empty.jsonl", b""))
    with pytest.raises(ApplicationError) as refused:
        evaluation_create(user=user, file=empty.id, models=["tiny"])
    assert (refused.value.param, refused.value.code) == ("file", "invalid_file")
    assert "did not pass validation" in refused.value.message


def test_models_on_two_bases_are_refused(
    user: Any, tiny_base_model: Any, held_out: Any, tiny_base_dir: Path
) -> None:
    """One evaluation shares one base forward: its models must share one base."""
    folder_base(tiny_base_dir, "tiny-copy", fingerprint=tiny_base_model.fingerprint, default=False)
    with pytest.raises(ApplicationError) as refused:
        evaluation_create(user=user, file=held_out.id, models=["tiny", "tiny-copy"])
    assert (refused.value.param, refused.value.code) == ("models", "models_on_different_bases")


def test_unfinished_evaluations_per_user_are_limited(
    user: Any, tiny_base_model: Any, held_out: Any, settings: Any
) -> None:
    """Past MAX_ACTIVE_EVALUATIONS_PER_USER unfinished ones: 403 naming the quota."""
    settings.CARRY_ON = {**settings.CARRY_ON, "MAX_ACTIVE_EVALUATIONS_PER_USER": 1}
    first = evaluation_create(user=user, file=held_out.id, models=["tiny"])
    with pytest.raises(ApplicationError) as refused:
        evaluation_create(user=user, file=held_out.id, models=["tiny"])
    assert (refused.value.status, refused.value.code) == (403, "active_evaluations_quota_exceeded")
    evaluation_cancel(evaluation=first)
    evaluation_create(user=user, file=held_out.id, models=["tiny"])


def test_an_evaluation_whose_worker_died_is_run_again_then_given_up(
    user: Any, tiny_base_model: Any, held_out: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """The workers' sweep sends a stale running evaluation again; the next claim runs it,
    unless its workers died MAX_ATTEMPTS times (then it fails with worker_lost)."""
    from datetime import timedelta

    from django.utils import timezone

    from webapp.evaluations.services import evaluation_claim, evaluation_sweep_stale

    evaluation = evaluation_create(user=user, file=held_out.id, models=["tiny"], **OPTIONS)
    long_ago = timezone.now() - timedelta(hours=1)
    Evaluation.objects.filter(pk=evaluation.pk).update(
        status="running", worker="dead", heartbeat_at=long_ago, attempts=1
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert evaluation_sweep_stale() == [evaluation.id]
    evaluation.refresh_from_db()
    assert (evaluation.status, evaluation.attempts) == ("succeeded", 2)
    assert evaluation_sweep_stale() == []

    Evaluation.objects.filter(pk=evaluation.pk).update(
        status="running", worker="dead", heartbeat_at=long_ago, attempts=3
    )
    assert evaluation_claim(evaluation_id=evaluation.id, worker="next") is None
    evaluation.refresh_from_db()
    assert (evaluation.status, evaluation.error["code"]) == ("failed", "worker_lost")


def test_examples_cut_before_their_answer_fail_the_evaluation_naming_the_line(
    user: Any, tiny_base_model: Any, held_out: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A max_length that leaves no answer token is reported with the example's line."""
    with django_capture_on_commit_callbacks(execute=True):
        evaluation = evaluation_create(
            user=user, file=held_out.id, models=["tiny"], max_length=8, exact_match=0
        )
    evaluation.refresh_from_db()
    assert evaluation.status == Evaluation.Status.FAILED
    assert (evaluation.error["code"], evaluation.error["param"]) == ("invalid_file", "file")
    assert "line 1" in evaluation.error["message"]
