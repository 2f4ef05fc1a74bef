"""Presets and tails through /v1: the job and model objects' extension fields, the 400s, and
each preset trained and chatted with through the official ``openai`` client.

The last test runs on the real bundled SmolLM2 with real Celery workers against a live
server: one job per preset ("fast", "balanced", "best"), followed by its events to success,
then a streamed chat with each result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from customization.presets import PRESETS
from tests.factories import AdapterFactory, FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.celery_workers import Workers
from tests.webapp.api.conftest import create_job, openai_client
from webapp.customizations.options import TAIL


@pytest.mark.django_db
def test_a_preset_job_object_carries_kind_preset_and_tail(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """POST with preset "balanced" answers a tail job: kind, preset and its resolved tail."""
    file = FileFactory(owner=user)
    response = create_job(api, model="lively", training_file=file.id, preset="balanced")
    assert response.status_code == 200, response.json()
    job = response.json()
    assert (job["kind"], job["preset"], job["carry_on"]) == ("tail", "balanced", {})
    assert job["tail"] == {**TAIL.defaults, "depth": 2}  # the two-layer base holds 2
    fetched = api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert (fetched["kind"], fetched["tail"]["depth"]) == ("tail", 2)
    plain = create_job(api, model="lively", training_file=file.id).json()
    assert (plain["kind"], plain["preset"], plain["tail"]) == ("carry_on", None, {})


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"preset": "turbo"}, "preset"),
        ({"tail": {"rank": 0}}, "tail.rank"),
        ({"tail": {"depth": 3}}, "tail.depth"),
        ({"tail": {"rank": 4}, "carry_on": {"d_model": 16}}, "tail"),
        ({"preset": "fast", "tail": {"rank": 4}}, "tail"),
        ({"preset": "best", "carry_on": {"d_model": 16}}, "carry_on"),
    ],
)
def test_bad_presets_and_tail_options_are_openai_400s_naming_the_param(
    api: Any, user: Any, lively_base_model: Any, body: dict[str, Any], param: str
) -> None:
    """Each is a 400 in OpenAI's error shape whose param names the wrong field."""
    file = FileFactory(owner=user)
    response = create_job(api, model="lively", training_file=file.id, **body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.django_db
def test_models_list_adapters_with_kind_depth_and_preset(
    api: Any, user: Any, lively_base_model: Any
) -> None:
    """/v1/models lists (and retrieves) each fine-tuned model with its kind, depth, preset."""
    tail = AdapterFactory(
        job=FineTuningJobFactory(owner=user, status="succeeded"),
        kind="tail",
        depth=2,
        preset="balanced",
    )
    carry_on = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    models = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert {k: models[tail.name][k] for k in ("kind", "depth", "preset")} == {
        "kind": "tail",
        "depth": 2,
        "preset": "balanced",
    }
    retrieved = api.get(f"/v1/models/{tail.name}").json()
    assert (retrieved["id"], retrieved["kind"], retrieved["depth"]) == (tail.name, "tail", 2)
    assert {k: models[carry_on.name][k] for k in ("kind", "depth", "preset")} == {
        "kind": "carry_on",
        "depth": None,
        "preset": None,
    }


def _demo_jsonl(n: int) -> bytes:
    from customization.demo_data import generate_demo_problems

    return "".join(json.dumps(row) + "\n" for row in generate_demo_problems(n, seed=0)).encode()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_each_preset_trains_and_chats_through_the_openai_client(
    live_server: Any, smollm2: Any, workers: Callable[..., Workers]
) -> None:
    """fast, balanced and best each train on the real base, are listed with their kind and
    depth, and stream a chat."""
    pool = workers()
    pool.start("all", "default,embed,train")
    user = UserFactory()
    client = openai_client(live_server, user, timeout=600)
    uploaded = client.files.create(file=("demo.jsonl", _demo_jsonl(12)), purpose="fine-tune")
    layers = smollm2.fingerprint["num_layers"]
    expected = {
        "fast": ("carry_on", None),
        "balanced": ("tail", PRESETS["balanced"].tail_depth(layers)),
        "best": ("tail", layers),
    }
    jobs = {}
    for preset, (kind, depth) in expected.items():
        job = client.fine_tuning.jobs.create(
            model=smollm2.name,
            training_file=uploaded.id,
            hyperparameters={"n_epochs": 1, "batch_size": 4},
            suffix=preset,
            seed=0,
            extra_body={"preset": preset},
        )
        assert (job.kind, job.preset) == (kind, preset)  # type: ignore[attr-defined]
        assert (job.tail or {}).get("depth") == depth  # type: ignore[attr-defined]
        jobs[preset] = job.id

    models: dict[str, str] = {}
    for preset, job_id in jobs.items():
        events = pool.follow(client, job_id, timeout=1800, poll=1)
        assert any(e.type == "metrics" for e in events), preset
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.status == "succeeded"
        assert job.fine_tuned_model
        models[preset] = job.fine_tuned_model

    listed = {m.id: m for m in client.models.list()}
    question = [{"role": "user", "content": "Tom has 3 boxes of 4 pencils. How many pencils?"}]
    for preset, (kind, depth) in expected.items():
        entry = listed[models[preset]]
        assert (entry.kind, entry.depth, entry.preset) == (kind, depth, preset)  # type: ignore[attr-defined]
        stream = client.chat.completions.create(
            model=models[preset],
            messages=question,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip(), (preset, pool.tail())
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens > 0
