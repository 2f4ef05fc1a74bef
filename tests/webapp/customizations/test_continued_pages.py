"""The pages around continued fine-tuning and the page gaps of issue 17: the parent on the job
and adapter pages and in the admin, adapter labels in the admin, checkpoints in the
playground, help texts that read their defaults from the config, and the minimum file size."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from customization.config import TAIL_LEARNING_RATE, TrainingConfig
from customization.presets import PRESETS
from tests.factories import (
    AdapterFactory,
    CheckpointFactory,
    FileFactory,
    FineTuningJobFactory,
    UserFactory,
    signed_in,
)
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.jobs import MIN_TRAINING_EXAMPLES
from webapp.customizations.services.planning import MAX_VALID_EXAMPLES, VALID_FRACTION

pytestmark = pytest.mark.django_db


def _family(user: Any) -> tuple[Any, Any]:
    """A parent adapter (labelled) and a child adapter whose job continued it."""
    parent = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"), label="v1")
    child_job = FineTuningJobFactory(
        owner=user, status="succeeded", parent=parent, parent_model=parent.name
    )
    return parent, AdapterFactory(job=child_job, parent=parent, label="v2")


def test_job_and_adapter_pages_show_the_parent(tiny_base_model: Any) -> None:
    """The job page names the model it continues (with its job); the adapter list too."""
    user = UserFactory()
    parent, child = _family(user)
    client = signed_in(user)
    job_page = client.get(f"/jobs/{child.job.id}/").content.decode()
    assert "Continues" in job_page
    assert parent.name in job_page
    assert f"/jobs/{parent.job.id}/" in job_page
    assert 'data-field="parent">continues' in client.get("/jobs/").content.decode()
    adapters = client.get("/adapters/").content.decode()
    assert 'data-field="parent">continues' in adapters
    assert adapters.count('data-field="parent"') == 1  # the parent itself continues nothing
    parent.delete()
    assert "(since deleted)" in client.get(f"/jobs/{child.job.id}/").content.decode()
    assert "(since deleted)" in client.get("/adapters/").content.decode()


def test_admin_shows_adapter_labels_and_parents(tiny_base_model: Any) -> None:
    """The adapter changelist has a label column and a parent column, searchable by label;
    the job changelist and pages name the parent model."""
    staff = UserFactory(is_staff=True, is_superuser=True)
    parent, child = _family(UserFactory())
    client = signed_in(staff)
    listing = client.get("/admin/customizations/adapter/").content.decode()
    assert "column-label" in listing
    assert "column-parent" in listing
    assert ">v2<" in listing
    found = client.get("/admin/customizations/adapter/?q=v2").content.decode()
    assert child.name in found
    assert parent.name not in found.split("result_list")[-1].split(child.name)[0]
    jobs = client.get("/admin/customizations/finetuningjob/").content.decode()
    assert "column-parent_model" in jobs
    assert parent.name in jobs
    page = client.get(f"/admin/customizations/adapter/{child.pk}/change/").content.decode()
    assert "v2" in page
    assert parent.name in page


def test_playground_lists_checkpoints_by_their_served_names(tiny_base_model: Any) -> None:
    """Each of the user's checkpoints is offered under the name /v1 serves it by."""
    user = UserFactory()
    adapter = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    running = FineTuningJobFactory(owner=user, status="running", suffix="live")
    done = CheckpointFactory(job=adapter.job, step=4)
    mid = CheckpointFactory(job=running, step=2)
    CheckpointFactory(job=FineTuningJobFactory(status="running"), step=9)  # a stranger's
    page = signed_in(user).get("/playground/").content.decode()
    assert 'label="Your checkpoints"' in page
    assert f'value="{done.model_name}"' in page
    assert f'value="{mid.model_name}"' in page
    assert "live · step 2" in page
    assert "step 9" not in page


def test_job_form_help_texts_read_their_defaults_from_the_config(tiny_base_model: Any) -> None:
    """The learning-rate help states the core's rates (kinds and presets); the hold-out
    choice and the training file's help state the pipeline's numbers."""
    user = UserFactory()
    FileFactory(owner=user)
    page = signed_in(user).get("/jobs/new/").content.decode()
    assert f"a carry-on&#x27;s {TrainingConfig().learning_rate:g}" in page
    assert f"a tail&#x27;s {TAIL_LEARNING_RATE:g}" in page
    for name, preset in PRESETS.items():
        assert f"{name} {preset.learning_rate:g}" in page
    assert (
        f"hold out {VALID_FRACTION:.0%} of the training set (at most {MAX_VALID_EXAMPLES}" in page
    )
    assert f"At least {MIN_TRAINING_EXAMPLES} examples" in page


def test_a_file_under_the_minimum_is_flagged_and_refused_on_the_pages(
    tiny_base_model: Any,
) -> None:
    """The dataset page warns (and offers no job); the job form answers 400 with the reason."""
    user = UserFactory()
    small = FileFactory(owner=user, content=toy_jsonl(MIN_TRAINING_EXAMPLES - 1))
    client = signed_in(user)
    page = client.get(f"/files/{small.id}/").content.decode()
    assert 'data-field="too-small"' in page
    assert f"needs at least {MIN_TRAINING_EXAMPLES}" in page
    assert "Start job with this dataset" not in page
    response = client.post(f"/files/{small.id}/jobs/", {"model": "tiny"})
    assert response.status_code == 400
    assert "must have at least 10 examples" in response.content.decode()
    assert not FineTuningJob.objects.exists()
    enough = FileFactory(owner=user, content=toy_jsonl(MIN_TRAINING_EXAMPLES))
    assert 'data-field="too-small"' not in client.get(f"/files/{enough.id}/").content.decode()


def test_an_adapter_is_continued_from_the_browser(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """ "Continue training" preselects the adapter as the job's model; the form then starts a
    job on it with its shape (the default preset radio does not apply), and refuses a size."""
    user = UserFactory()
    parent = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    file = FileFactory(owner=user)
    client = signed_in(user)
    link = f"/jobs/new/?model={parent.name.replace(':', '%3A')}"
    assert link in client.get("/adapters/").content.decode()
    page = client.get(link).content.decode()
    assert 'label="Continue training an adapter"' in page
    assert f'value="{parent.name}" selected' in page
    form = {"training_file": file.id, "model": parent.name, "preset": "fast", "n_epochs": "1"}
    refused = client.post("/jobs/new/", {**form, "d_model": "32"})
    assert refused.status_code == 400
    assert "keeps its parent&#x27;s size" in refused.content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post("/jobs/new/", form)
    job = FineTuningJob.objects.exclude(pk=parent.job_id).get()
    assert response.status_code == 302
    assert (job.parent, job.parent_model, job.base) == (parent, parent.name, parent.base)
    assert (job.kind, job.preset, job.carry_on["d_model"]) == ("carry_on", "", 16)
    assert job.hyperparameters["n_epochs"] == 1


def test_the_api_schema_states_the_defaults_and_ranges_the_service_uses(
    tiny_base_model: Any,
) -> None:
    """The job hyperparameters' descriptions in /v1/openapi.json come from the service's
    tables and the core's learning rates."""
    from webapp.customizations.options import AUTO_HYPERPARAMETERS, HYPERPARAMETER_RANGES

    schema = Client().get("/v1/openapi.json").content.decode()
    for name in ("n_epochs", "batch_size"):
        _, low, high = HYPERPARAMETER_RANGES[name]
        assert f"(default {AUTO_HYPERPARAMETERS[name]:g}) or {low:g}..{high:g}" in schema
    assert f"carry-on's {TrainingConfig().learning_rate:g}" in schema
    assert f"tail's {TAIL_LEARNING_RATE:g}" in schema
