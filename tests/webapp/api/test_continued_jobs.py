"""Continued fine-tuning through /v1 (OpenAI's: a job's ``model`` may be a fine-tuned model):
the parent's base, kind, shape and preset; the 400s that name a contradicting option; 404 for
an adapter that is not the caller's; and the minimum training-file size.

The last test runs it end to end with real Celery workers and the official ``openai`` client:
the continued job's first step starts from the parent's weights, and its adapter records the
parent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.factories import (
    AdapterFactory,
    CheckpointFactory,
    FileFactory,
    FineTuningJobFactory,
    tail_adapter,
)
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from tests.webapp.api.conftest import create_job, openai_client
from webapp.customizations.models import Adapter, FineTuningJob
from webapp.customizations.services.jobs import MIN_TRAINING_EXAMPLES


@pytest.mark.django_db
def test_a_job_on_an_adapter_continues_its_base_kind_shape_and_preset(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """``model`` = one of the caller's adapters: the job keeps its base and shape, records it
    as parent, and shows it as ``model`` and ``parent_model``; extras still apply."""
    parent = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    file = FileFactory(owner=user)
    response = create_job(
        api, model=parent.name, training_file=file.id, carry_on={"max_length": 48, "d_model": 16}
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert (body["model"], body["parent_model"], body["kind"]) == (
        parent.name,
        parent.name,
        "carry_on",
    )
    shape = ("d_model", "n_blocks", "n_heads", "mlp_ratio", "taps", "tap_mode", "alpha", "dropout")
    assert {k: body["carry_on"][k] for k in shape} == {k: parent.job.carry_on[k] for k in shape}
    assert body["carry_on"]["max_length"] == 48
    job = FineTuningJob.objects.get(pk=body["id"])
    assert (job.parent, job.base) == (parent, parent.base)

    tail_parent = tail_adapter(owner=user, rank=4)
    tail = create_job(api, model=tail_parent.name, training_file=file.id).json()
    assert (tail["kind"], tail["preset"], tail["parent_model"]) == (
        "tail",
        "balanced",
        tail_parent.name,
    )
    assert (tail["tail"]["depth"], tail["tail"]["rank"]) == (2, 4)
    on_base = create_job(api, model="lively", training_file=file.id).json()
    assert (on_base["model"], on_base["parent_model"]) == ("lively", None)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("tail_parent", "body", "param"),
    [
        (False, {"carry_on": {"d_model": 32}}, "carry_on.d_model"),
        (False, {"carry_on": {"taps": "auto"}}, "carry_on.taps"),  # the ladder, not [-1]
        (False, {"tail": {"rank": 4}}, "tail"),
        (False, {"preset": "fast"}, "preset"),  # the parent was custom
        (True, {"tail": {"depth": 1}}, "tail.depth"),
        (True, {"tail": {"target_modules": ["q_proj"]}}, "tail.target_modules"),
        (True, {"preset": "best"}, "preset"),
        (True, {"carry_on": {"d_model": 16}}, "carry_on"),
    ],
)
def test_options_that_contradict_the_parent_are_400s_naming_them(
    api: Any, user: Any, lively_base_model: Any, tail_parent: bool, body: Any, param: str
) -> None:
    """A shape option other than the parent's, another preset, or the other kind's options."""
    parent = (
        tail_adapter(owner=user, rank=4)
        if tail_parent
        else AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    )
    response = create_job(api, model=parent.name, training_file=FileFactory(owner=user).id, **body)
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param


@pytest.mark.django_db
def test_another_users_adapter_is_a_404_like_an_unknown_one(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """Someone else's fine-tuned model answers exactly as a missing one does; no job is made."""
    foreign = AdapterFactory()  # another owner
    file = FileFactory(owner=user)
    theirs = create_job(api, model=foreign.name, training_file=file.id)
    missing = create_job(api, model=foreign.name + "x", training_file=file.id)
    assert (theirs.status_code, missing.status_code) == (404, 404)
    for response in (theirs, missing):
        error = response.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (
            "model",
            "not_found",
            "invalid_request_error",
        )
    assert not FineTuningJob.objects.filter(owner=user).exists()


@pytest.mark.django_db
def test_a_checkpoint_or_an_adapter_without_its_job_cannot_be_continued(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """Both are clear 400s naming ``model``: a checkpoint points to its job's model; an
    adapter whose job was deleted has no recorded shape."""
    parent = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    checkpoint = CheckpointFactory(job=parent.job, step=3)
    file = FileFactory(owner=user)
    response = create_job(api, model=checkpoint.model_name, training_file=file.id)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
    assert "checkpoint" in response.json()["error"]["message"]
    parent.job.delete()
    response = create_job(api, model=parent.name, training_file=file.id)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


@pytest.mark.django_db
def test_a_training_file_under_the_minimum_is_refused_naming_it(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """OpenAI's minimum of 10 examples: 9 is a 400 on ``training_file``, 10 is accepted."""
    small = FileFactory(owner=user, content=toy_jsonl(MIN_TRAINING_EXAMPLES - 1))
    response = create_job(api, model="lively", training_file=small.id)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("training_file", "invalid_n_examples")
    assert "9 example(s)" in error["message"]
    enough = FileFactory(owner=user, content=toy_jsonl(MIN_TRAINING_EXAMPLES))
    assert create_job(api, model="lively", training_file=enough.id).status_code == 200


def _parent_loss_on_first_batch(job: FineTuningJob, parent: Adapter, batch_size: int) -> float:
    """The parent adapter's loss on the continued job's first batch, from its cached features."""
    import torch

    from customization.base_model import load_base_model
    from customization.checkpoint import load_carry_on
    from customization.features import FeatureData
    from customization.features import FeatureSet as CachedFeatures
    from customization.training import FeatureLayout, evaluate
    from webapp.core.utils import data_path

    assert job.train_features is not None
    data = CachedFeatures.open(data_path(job.train_features.path)).load()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(job.seed * 1000))
    first = FeatureData(
        [data.examples[i] for i in order.tolist()[:batch_size]], data.states, data.state_sizes
    )
    base = load_base_model(job.base.path, name=job.base.name)
    model = load_carry_on(data_path(parent.path), expected_sha256=parent.sha256)
    layout = FeatureLayout.for_config(first, model.config, base.num_layers)
    return evaluate(model, first, layout, base.head_weight, batch_size=batch_size)["loss"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_continued_job_starts_from_its_parent_and_records_it(
    live_server: Any,
    tiny_base_model: Any,
    make_adapter: Callable[..., Any],
    workers: Callable[..., Workers],
) -> None:
    """Through the openai client with real workers: a job whose ``model`` is the caller's
    adapter takes its first step from the adapter's weights (its loss is the adapter's loss on
    that batch), and its job and new adapter record the parent; a stranger gets a 404."""
    from tests.factories import UserFactory

    pool = workers()
    pool.start("all", "default,embed,train")
    user, stranger = UserFactory(), UserFactory()
    parent = make_adapter(user, tiny_base_model, seed=1, suffix="parent")

    client = openai_client(live_server, user)
    uploaded = client.files.create(file=("toy.jsonl", toy_jsonl(24)), purpose="fine-tune")
    created = client.fine_tuning.jobs.create(
        model=parent.name,
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        suffix="child",
        seed=5,
    )
    assert created.model == parent.name
    assert created.parent_model == parent.name  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        openai_client(live_server, stranger).fine_tuning.jobs.create(
            model=parent.name, training_file=uploaded.id
        )

    events = pool.follow(client, created.id, timeout=900, poll=0.5)
    assert any(f"from the weights of {parent.name}" in e.message for e in events)
    first_step = next(e for e in events if e.type == "metrics" and e.data["step"] == 1)
    job = FineTuningJob.objects.select_related("train_features", "base").get(pk=created.id)
    expected = _parent_loss_on_first_batch(job, parent, batch_size=4)
    assert first_step.data["train_loss"] == pytest.approx(expected, rel=1e-4)

    done = client.fine_tuning.jobs.retrieve(created.id)
    assert done.status == "succeeded"
    child = Adapter.objects.get(name=done.fine_tuned_model)
    assert (child.parent, job.parent) == (parent, parent)
    assert done.parent_model == parent.name  # type: ignore[attr-defined]
