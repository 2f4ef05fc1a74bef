"""The official ``openai`` client against a live server: only base_url and api_key change.

The first test runs the whole story on the real bundled SmolLM2 with a real Celery worker:
upload, fine-tune, follow the job, list models, chat (plain and streamed) with the base and
the fine-tuned carry-on. The others use a tiny base for error classes and concurrency.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from customization.demo_data import generate_demo_problems
from tests.factories import UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from tests.webapp.api.conftest import openai_client

pytestmark = pytest.mark.django_db(transaction=True)


def _demo_jsonl(n: int) -> bytes:
    rows = generate_demo_problems(n, seed=0)
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _wait(client: openai.OpenAI, job_id: str, pool: Workers, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"
            return job
        time.sleep(1)
    raise AssertionError(f"{job_id} did not finish\n{pool.tail()}")


@pytest.mark.integration
@pytest.mark.slow
def test_the_openai_client_fine_tunes_and_chats_on_the_real_base(
    live_server: Any, smollm2: Any, workers: Callable[..., Workers]
) -> None:
    """files, fine_tuning.jobs (+events, checkpoints, cancel), models and chat all work."""
    pool = workers()
    pool.start("all", "default,embed,train")
    user = UserFactory()
    client = openai_client(live_server, user)

    uploaded = client.files.create(file=("demo.jsonl", _demo_jsonl(20)), purpose="fine-tune")
    assert uploaded.status == "processed"
    assert client.files.content(uploaded.id).read() == _demo_jsonl(20)

    job = client.fine_tuning.jobs.create(
        model=smollm2.name,
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 1, "batch_size": 8},
        suffix="demo",
        seed=0,
        extra_body={"carry_on": {"checkpoint_every": 1}},
    )
    job = _wait(client, job.id, pool)
    assert job.fine_tuned_model == f"ft:{smollm2.name}:{user.username}:demo:{job.id}"
    assert job.trained_tokens
    assert job.trained_tokens > 0
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5)] == [job.id]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any(e.type == "metrics" for e in events)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(job.fine_tuned_model)

    models = {m.id: m.owned_by for m in client.models.list()}
    assert models[smollm2.name] == "system"
    assert models[job.fine_tuned_model] == user.username
    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model

    question = [{"role": "user", "content": "Tom has 3 boxes of 4 pencils. How many pencils?"}]
    replies = {}
    for model in (smollm2.name, job.fine_tuned_model, checkpoints[-1].fine_tuned_model_checkpoint):
        reply = client.chat.completions.create(
            model=model, messages=question, max_tokens=16, temperature=0
        )
        assert reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0
        replies[model] = reply.choices[0].message.content
    stream = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=question,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == replies[job.fine_tuned_model]  # streamed = non-streamed (greedy)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0

    second = client.fine_tuning.jobs.create(model=smollm2.name, training_file=uploaded.id)
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"

    assert client.models.delete(job.fine_tuned_model).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(job.fine_tuned_model)


def test_error_paths_raise_the_right_openai_exceptions(
    live_server: Any, lively_base_model: Any, make_adapter: Any, settings: Any
) -> None:
    """Bad key, foreign or missing ids, bad data, too large and too many each map right."""
    user = UserFactory()
    client = openai_client(live_server, user)
    foreign = make_adapter(UserFactory(), lively_base_model, seed=2)
    hello = [{"role": "user", "content": "hi"}]

    bad = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="sk-co-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.models.list()
    assert auth.value.code == "invalid_api_key"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=foreign.name, messages=hello)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(foreign.name)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")

    malformed = toy_jsonl(2) + b'{"messages": "not a list"}\n'
    with pytest.raises(openai.BadRequestError) as bad_file:
        client.files.create(file=("bad.jsonl", malformed), purpose="fine-tune")
    assert bad_file.value.param == "file"
    assert "line 3" in bad_file.value.message
    with pytest.raises(openai.BadRequestError) as bad_request:
        client.chat.completions.create(model="lively", messages=hello, temperature=5)
    assert bad_request.value.param == "temperature"

    settings.CARRY_ON_MAX_UPLOAD_BYTES = 64
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", toy_jsonl(50)), purpose="fine-tune")
    assert too_large.value.status_code == 413

    settings.CARRY_ON = {**settings.CARRY_ON, "RATE_LIMIT_PER_MINUTE": 2}
    limited = openai_client(live_server, user)
    limited.models.list()
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as rate:
        limited.models.list()
    assert rate.value.response.headers["retry-after"]


def test_concurrent_streams_on_two_adapters_share_the_base_forward(
    live_server: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """Two streamed requests on two adapters complete, share base steps, and each equals
    that adapter's greedy output alone."""
    from customization.base_model import load_base_model
    from customization.checkpoint import load_carry_on
    from customization.config import GenerationConfig
    from customization.generation import generate
    from webapp.core.utils import data_path
    from webapp.serving.services import engine_counters

    user = UserFactory()
    adapters = [make_adapter(user, lively_base_model, seed=s) for s in (1, 2)]
    prompts = ["tell me a story about rivers", "count"]
    base = load_base_model(lively_base_model.path, name="lively")
    config = GenerationConfig(temperature=0.0, max_new_tokens=40)
    alone = [
        generate(
            base,
            base.tokenizer.encode_prompt([{"role": "user", "content": p}]),
            config,
            load_carry_on(data_path(a.path)),
        ).text
        for a, p in zip(adapters, prompts, strict=True)
    ]
    client = openai_client(live_server, user)
    client.chat.completions.create(
        model="lively", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )  # fmt: skip  (loads the base once)
    before = engine_counters("lively")
    barrier = threading.Barrier(2)
    texts = ["", ""]

    def run(index: int) -> None:
        barrier.wait()
        stream = client.chat.completions.create(
            model=adapters[index].name,
            messages=[{"role": "user", "content": prompts[index]}],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
        texts[index] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = engine_counters("lively")
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert texts == alone
    assert rows > steps, (rows, steps)  # some base forwards served both requests
    forwards = after["base_forwards"] - before["base_forwards"]
    prefills = after["prefill_forwards"] - before["prefill_forwards"]
    # One prefill forward each, or one for both when they arrive together; then shared steps
    # (a prompt joining a running row rides in its decode forward: packed).
    packed = after["packed_forwards"] - before["packed_forwards"]
    assert prefills in (1, 2), prefills
    assert forwards == steps + prefills - packed
