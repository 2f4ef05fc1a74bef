"""Hardening of the job pipeline, run in-process (eager tasks) on a tiny base: operator caps,
checkpoint retention, per-owner feature caches, diverged training, jobs no worker takes."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient
from safetensors.torch import load_file, save_file

from tests.factories import PASSWORD, FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.eager_jobs import TINY, run_job
from webapp.accounts.services import api_key_create
from webapp.core.utils import data_path
from webapp.customizations.artifacts import write_bytes_atomic
from webapp.customizations.models import FineTuningJob
from webapp.customizations.services import claims, results

pytestmark = pytest.mark.django_db


def _api(user: Any) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user)[1]}")
    return api


# -- operator caps and retention ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("carry_on", "param", "code"),
    [
        ({"max_length": 131_072}, "carry_on.max_length", "option_above_limit"),
        # one block of width 2048: about 67 M parameters (268 MB), over the default ceiling
        ({"d_model": 2048, "n_blocks": 1, "n_heads": 16}, "carry_on", "carry_on_too_large"),
    ],
)
def test_job_options_above_the_operators_caps_are_refused_naming_the_option(
    tiny_base_model: Any, carry_on: dict[str, Any], param: str, code: str
) -> None:
    """A 400 that names the option; nothing is created."""
    user = UserFactory()
    body = {
        "model": tiny_base_model.name,
        "training_file": FileFactory(owner=user).id,
        "carry_on": carry_on,
    }
    response = _api(user).post("/v1/fine_tuning/jobs", body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert not FineTuningJob.objects.exists()


def test_the_max_length_cap_is_the_operators_setting(tiny_base_model: Any, settings: Any) -> None:
    """With CARRY_ON_MAX_LENGTH_CAP at 128, a max_length of 256 is refused."""
    user = UserFactory()
    api = _api(user)
    file = FileFactory(owner=user)
    body = {"model": "tiny", "training_file": file.id, "carry_on": {"max_length": 256}}
    settings.CARRY_ON = {**settings.CARRY_ON, "MAX_LENGTH_CAP": 128}
    refused = api.post("/v1/fine_tuning/jobs", body, format="json")
    assert refused.status_code == 400
    assert "at most 128" in refused.json()["error"]["message"]


def test_a_carry_on_that_would_not_fit_the_serving_cache_is_refused(
    tiny_base_model: Any, settings: Any
) -> None:
    """Whatever the parameter ceiling, a carry-on larger than the serving cache is refused."""
    settings.CARRY_ON = {
        **settings.CARRY_ON,
        "MAX_CARRY_ON_PARAMETERS": 10**12,
        "SERVING_ADAPTER_CACHE_BYTES": 64 * 1024,
    }
    user = UserFactory()
    file = FileFactory(owner=user)
    body = {"model": "tiny", "training_file": file.id, "carry_on": {"d_model": 64}}
    response = _api(user).post("/v1/fine_tuning/jobs", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "carry_on_too_large"


def test_only_the_newest_checkpoints_are_kept(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    """checkpoint_every=1 with KEEP_CHECKPOINTS=2: two records and two folders remain."""
    settings.CARRY_ON = {**settings.CARRY_ON, "KEEP_CHECKPOINTS": 2}
    user = UserFactory()
    job = run_job(
        django_capture_on_commit_callbacks, user, FileFactory(owner=user),
        carry_on={**TINY, "checkpoint_every": 1},
    )  # fmt: skip
    assert job.status == "succeeded", job.error
    assert list(job.checkpoints.order_by("step").values_list("step", flat=True)) == [7, 8]
    folders = sorted(p.name for p in data_path(f"jobs/{job.id}/checkpoints").iterdir())
    assert folders == ["step-00000007", "step-00000008"]


# -- the feature cache is per owner ------------------------------------------------------------


def _normalized(job: FineTuningJob) -> list[tuple[str, str, list[str]]]:
    """The job's events as its owner sees them, with ids and names made neutral."""
    words = [job.id, job.owner.username]
    if job.training_file is not None:
        words.append(job.training_file.id)
    rows = []
    for event in job.events.order_by("seq"):
        message = event.message
        for word in words:
            message = message.replace(word, "<id>")
        keys = sorted(k for k in event.data if k not in ("worker", "tokens_per_second"))
        rows.append((event.type, re.sub(r"\d+\.\d+", "<n>", message), keys))
    return rows


def test_a_job_shows_nothing_of_another_users_upload_of_the_same_data(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Same bytes uploaded by two users: the second user's job extracts its own features
    and its events are exactly those of a first job."""
    first_user, second_user = UserFactory(), UserFactory()
    first = run_job(django_capture_on_commit_callbacks, first_user, FileFactory(owner=first_user))
    second = run_job(
        django_capture_on_commit_callbacks, second_user, FileFactory(owner=second_user)
    )
    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert second.train_features_id != first.train_features_id
    assert second.valid_features_id != first.valid_features_id
    assert not second.events.filter(data__extraction_skipped=True).exists()
    assert _normalized(second) == _normalized(first)

    again = run_job(django_capture_on_commit_callbacks, second_user, FileFactory(owner=second_user))
    assert again.train_features_id == second.train_features_id  # the owner's own cache holds
    assert again.events.filter(data__extraction_skipped=True).exists()


# -- a diverged run -----------------------------------------------------------------------------


def _poison(feature_set: Any) -> None:
    """Overwrite every stored hidden state with NaN, as a broken extraction would leave."""
    folder = data_path(feature_set.path)
    for shard in sorted(folder.glob("shard-*.safetensors")):
        tensors = load_file(str(shard))
        for key, value in tensors.items():
            if key.startswith("state.") and value.is_floating_point():
                tensors[key] = torch.full_like(value, float("nan"))
        save_file(tensors, str(shard))


def test_a_nan_loss_fails_the_job_as_training_diverged_and_its_pages_still_answer(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """NaN features give a NaN loss: the job fails with training_diverged; its page and
    live endpoint answer 200; a NaN reaching the metrics is stored as null."""
    user = UserFactory()
    file = FileFactory(owner=user)
    first = run_job(django_capture_on_commit_callbacks, user, file)
    assert first.status == "succeeded", first.error
    _poison(first.train_features)
    job = run_job(django_capture_on_commit_callbacks, user, file)
    assert job.status == "failed"
    assert job.error["code"] == "training_diverged"
    assert "step 1" in job.error["message"]
    assert not job.checkpoints.exists()

    results.job_record_metrics(
        job=job,
        data={"step": 1, "total_steps": 8, "train_loss": float("nan"), "valid_loss": float("inf")},
        message="Step 1/8: training loss=nan",
    )
    stored = job.events.filter(type="metrics").get()
    assert (stored.data["train_loss"], stored.data["valid_loss"]) == (None, None)
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    assert client.get(f"/jobs/{job.id}/").status_code == 200
    live = client.get(f"/jobs/{job.id}/live/")
    assert live.status_code == 200
    assert live.json()["status"] == "failed"


# -- a worker that lost its claim --------------------------------------------------------------


def test_a_worker_that_lost_its_claim_removes_only_its_own_adapter(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    """A worker finishing a job another worker already finished (it stalled, was taken
    over, and never heard of it: no heartbeat in between) leaves the winner's adapter."""
    from customization.checkpoint import artifact_sha256
    from workers import tasks

    user = UserFactory()
    job = run_job(django_capture_on_commit_callbacks, user, FileFactory(owner=user))
    assert job.status == "succeeded", job.error
    adapter = job.adapter
    settings.CARRY_ON = {**settings.CARRY_ON, "HEARTBEAT_INTERVAL": 3600}
    job.status = "running"  # what the stalled worker last read
    tasks._train(job, "stalled-worker")  # its own run ends; recording the result fails
    assert artifact_sha256(data_path(adapter.path)) == adapter.sha256
    assert [p.name for p in data_path("adapters").iterdir()] == [Path(adapter.path).name]
    job.refresh_from_db()
    assert job.status == "succeeded"


def _run_training_stage(body: Any, *, retries: int = 0) -> tuple[str, FineTuningJob]:
    """A queued training job run through the stage runner with ``body`` as its work, as the
    ``retries``-th retry of an eager task: (the task's outcome, the job as stored after)."""
    from workers import tasks

    job = FineTuningJobFactory(status="queued", stage=FineTuningJob.Stage.TRAINING)
    task = SimpleNamespace(request=SimpleNamespace(is_eager=True, retries=retries), max_retries=5)
    outcome = tasks._run_stage(task, job.id, FineTuningJob.Stage.TRAINING, body)
    job.refresh_from_db()
    return outcome, job


@pytest.mark.parametrize("error", [RuntimeError("no such folder"), OSError(2, "No such file")])
def test_a_stage_that_errs_after_losing_its_claim_stops_and_leaves_the_job_alone(
    tiny_base_model: Any, error: Exception
) -> None:
    """A worker frozen mid-save wakes after the winner finished and cleaned up: the error it
    meets then (a checkpoint folder gone) is a symptom of the lost claim, so its task ends
    "stopped", and the job keeps the state the winner gave it (not failed)."""

    def taken_over_then_fails(job: FineTuningJob, worker: str) -> None:
        FineTuningJob.objects.filter(pk=job.pk).update(worker="winner", status="succeeded")
        raise error

    outcome, job = _run_training_stage(taken_over_then_fails)
    assert outcome == "stopped"
    assert (job.status, job.worker, job.error) == ("succeeded", "winner", None)


def test_a_stage_that_errs_holding_its_claim_fails_the_job(tiny_base_model: Any) -> None:
    """The same error while the claim is still this worker's fails the job, naming it."""

    def fails(job: FineTuningJob, worker: str) -> None:
        raise RuntimeError("no such folder")

    outcome, job = _run_training_stage(fails)
    assert outcome == "failed"
    assert job.status == "failed"
    assert job.error["code"] == "internal_error"
    assert "RuntimeError: no such folder" in job.error["message"]


def test_a_stage_whose_retries_ran_out_fails_the_job_as_an_infrastructure_error(
    tiny_base_model: Any,
) -> None:
    """A transient error (here the database's) on the last retry: the claim is released and
    the job, held by no one since, fails naming the stage and the error."""
    from django.db import OperationalError

    def database_gone(job: FineTuningJob, worker: str) -> None:
        raise OperationalError("server closed the connection")

    outcome, job = _run_training_stage(database_gone, retries=5)
    assert outcome == "failed"
    assert (job.status, job.worker) == ("failed", "")
    assert job.error["code"] == "infrastructure_error"
    assert "training stage kept failing: server closed" in job.error["message"]


# -- a job that no worker takes -----------------------------------------------------------------


def test_a_queued_job_no_worker_takes_fails_after_the_configured_sends(
    tiny_base_model: Any, settings: Any
) -> None:
    """Sent again MAX_REQUEUES times and still unclaimed: failed, naming the queue."""
    settings.CARRY_ON = {**settings.CARRY_ON, "REQUEUE_AFTER": 60, "MAX_REQUEUES": 2}
    job = FineTuningJobFactory(status="queued", stage="extracting")

    def sweep() -> list[str]:
        # Each sweep finds the job waiting longer than REQUEUE_AFTER since the last send.
        FineTuningJob.objects.filter(pk=job.pk).update(
            updated_at=timezone.now() - timedelta(minutes=2)
        )
        return claims.job_sweep_unclaimed()

    assert sweep() == [job.id]
    assert sweep() == [job.id]
    assert sweep() == []
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error["code"] == "no_worker_available"
    assert "'embed' queue" in job.error["message"]
    assert sweep() == []  # failed for good: never sent again


def test_a_claim_resets_the_count_of_sends(tiny_base_model: Any, settings: Any) -> None:
    """A job a worker took after a resend starts counting afresh (a later stage may wait)."""
    settings.CARRY_ON = {**settings.CARRY_ON, "REQUEUE_AFTER": 60, "MAX_REQUEUES": 1}
    job = FineTuningJobFactory(status="queued", stage="extracting")
    FineTuningJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert claims.job_sweep_unclaimed() == [job.id]
    assert claims.job_claim(job_id=job.id, stage="extracting", worker="w") is not None
    job.refresh_from_db()
    assert job.requeues == 0


# -- durable writes ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fds")
def test_an_upload_is_flushed_before_its_rename_and_its_folder_after(
    data_dir: Path, fsynced: list[Path]
) -> None:
    """write_bytes_atomic: the temporary file is on disk before the rename, the name after."""
    target = data_path("files/upload.jsonl")
    write_bytes_atomic(target, toy_jsonl(2))
    assert len(fsynced) == 2
    assert fsynced[0].parent == target.parent
    assert fsynced[0].name.endswith(".tmp")
    assert fsynced[1] == target.parent
    assert target.read_bytes() == toy_jsonl(2)
