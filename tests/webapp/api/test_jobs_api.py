"""/v1/fine_tuning/jobs: create (OpenAI fields + the carry_on extension), list, cancel,
events and checkpoints, each shaped like OpenAI's objects."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import (
    CheckpointFactory,
    FileFactory,
    FineTuningJobFactory,
    JobEventFactory,
    UserFactory,
)
from webapp.customizations.models import FineTuningJob

pytestmark = pytest.mark.django_db


def _create(api: Any, **body: Any) -> Any:
    return api.post("/v1/fine_tuning/jobs", body, format="json")


def test_create_returns_an_openai_job_object(api: Any, user: Any, lively_base_model: Any) -> None:
    """A job is created from a processed file with OpenAI's fields plus carry-on options."""
    file = FileFactory(owner=user)
    response = _create(
        api,
        model="lively",
        training_file=file.id,
        hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 1.5},
        suffix="math",
        seed=7,
        metadata={"team": "a"},
        carry_on={"d_model": 16, "n_heads": 2, "n_blocks": 1},
    )
    assert response.status_code == 200, response.json()
    job = response.json()
    assert job["id"].startswith("ftjob-")
    assert job["object"] == "fine_tuning.job"
    assert job["model"] == "lively"
    assert job["status"] == "validating_files"
    assert job["training_file"] == file.id
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": "auto",
        "learning_rate_multiplier": 1.5,
    }
    assert job["seed"] == 7
    assert job["user_provided_suffix"] == "math"
    assert job["metadata"] == {"team": "a"}
    assert job["carry_on"]["d_model"] == 16
    assert job["fine_tuned_model"] is None
    assert job["method"]["type"] == "supervised"


def test_method_supervised_hyperparameters_are_accepted(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """OpenAI's newer ``method`` field carries the same hyperparameters."""
    file = FileFactory(owner=user)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}}
    job = _create(api, model="lively", training_file=file.id, method=method).json()
    assert job["hyperparameters"]["n_epochs"] == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_file": "file-missing"}, "training_file"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
        ({"model": "no-such-model"}, "model"),
        ({"suffix": "bad suffix!"}, "suffix"),
        ({"method": {"type": "dpo"}}, "method"),
        ({"carry_on": {"d_model": 3}}, "carry_on"),
        ({"carry_on": {"flavour": "x"}}, "carry_on.flavour"),
        ({"colour": "blue"}, "colour"),
        ({"integrations": [{"type": "wandb"}]}, "integrations"),
    ],
)
def test_bad_job_requests_name_their_param(
    api: Any, user: Any, lively_base_model: Any, body: dict[str, Any], param: str
) -> None:
    """Each invalid field answers 400 with ``param`` naming it, and creates no job."""
    file = FileFactory(owner=user)
    response = _create(api, **{"model": "lively", "training_file": file.id, **body})
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param
    assert not FineTuningJob.objects.exists()


def test_jobs_list_pages_and_filters_by_metadata(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """The list pages newest first with after/limit and filters on metadata[key]."""
    jobs = [FineTuningJobFactory(owner=user, metadata={"n": str(i)}) for i in range(3)]
    FineTuningJobFactory(owner=UserFactory())
    page = api.get("/v1/fine_tuning/jobs?limit=2").json()
    assert [j["id"] for j in page["data"]] == [jobs[2].id, jobs[1].id]
    assert page["has_more"] is True
    rest = api.get(f"/v1/fine_tuning/jobs?limit=2&after={page['data'][-1]['id']}").json()
    assert [j["id"] for j in rest["data"]] == [jobs[0].id]
    filtered = api.get("/v1/fine_tuning/jobs?metadata[n]=1").json()
    assert [j["id"] for j in filtered["data"]] == [jobs[1].id]


def test_cancel_returns_the_cancelled_job_and_refuses_a_second_time(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """Cancelling a queued job answers the job as cancelled; a finished job is a 409."""
    job = FineTuningJobFactory(owner=user, status="queued")
    response = api.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = api.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    assert again.status_code == 409


def test_events_are_listed_newest_first(api: Any, user: Any, lively_base_model: Any) -> None:
    """Events come back as fine_tuning.job.event objects, newest first, paginated."""
    job = FineTuningJobFactory(owner=user)
    JobEventFactory(job=job, message="first", seq=1)
    JobEventFactory(job=job, message="second", seq=2, type="metrics", data={"step": 1})
    page = api.get(f"/v1/fine_tuning/jobs/{job.id}/events?limit=1").json()
    assert [e["message"] for e in page["data"]] == ["second"]
    assert page["data"][0]["object"] == "fine_tuning.job.event"
    assert page["data"][0]["type"] == "metrics"
    assert page["has_more"] is True


def test_checkpoints_are_named_after_the_fine_tuned_model(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """Each checkpoint is servable as ``<fine-tuned model>:ckpt-step-N``."""
    job = FineTuningJobFactory(owner=user, suffix="s")
    CheckpointFactory(job=job, step=10, metrics={"train_loss": 1.5, "valid_loss": 1.7})
    data = api.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]
    assert data[0]["fine_tuned_model_checkpoint"] == (
        f"ft:lively:{user.username}:s:{job.id}:ckpt-step-10"
    )
    assert data[0]["step_number"] == 10
    assert data[0]["metrics"]["train_loss"] == 1.5
