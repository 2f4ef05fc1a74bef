"""/v1/chat/completions on a base, an adapter and a checkpoint; streaming; bad requests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.factories import CheckpointFactory

pytestmark = pytest.mark.django_db

HELLO = [{"role": "user", "content": "hello there"}]


def _chat(api: Any, **body: Any) -> Any:
    return api.post("/v1/chat/completions", {"messages": HELLO, **body}, format="json")


def _direct(base_model: Any, adapter: Any | None, messages: Any, max_tokens: int) -> str:
    """What generate() produces for the same request, outside the server."""
    from customization.base_model import load_base_model
    from customization.checkpoint import load_carry_on
    from customization.config import GenerationConfig
    from customization.generation import generate
    from webapp.core.utils import data_path

    base = load_base_model(base_model.path, name=base_model.name)
    carry_on = load_carry_on(data_path(adapter.path)) if adapter is not None else None
    prompt = base.tokenizer.encode_prompt(messages)
    config = GenerationConfig(temperature=0.0, max_new_tokens=max_tokens)
    return generate(base, prompt, config, carry_on).text


def _sse(response: Any) -> list[Any]:
    text = b"".join(response.streaming_content).decode()
    frames = [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(frame) for frame in frames[:-1]]


def test_chat_on_a_base_returns_a_completion_with_usage(api: Any, lively_base_model: Any) -> None:
    """A non-streamed completion has OpenAI's shape and the same text as generate()."""
    response = _chat(api, model="lively", temperature=0, max_tokens=8)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "lively"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == _direct(lively_base_model, None, HELLO, 8)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 8


def test_chat_on_an_adapter_serves_its_carry_on(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """An adapter's answer is base + that carry-on, and differs from the base's."""
    adapter = make_adapter(user, lively_base_model, seed=1)
    text = _chat(api, model=adapter.name, temperature=0, max_tokens=12).json()
    content = text["choices"][0]["message"]["content"]
    assert content == _direct(lively_base_model, adapter, HELLO, 12)
    assert content != _direct(lively_base_model, None, HELLO, 12)


def test_chat_on_a_checkpoint_serves_that_checkpoint(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """``<model>:ckpt-step-N`` serves the checkpoint's artifact."""
    adapter = make_adapter(user, lively_base_model, seed=1)
    CheckpointFactory(job=adapter.job, step=4, path=adapter.path, sha256=adapter.sha256)
    response = _chat(api, model=f"{adapter.name}:ckpt-step-4", temperature=0, max_tokens=6)
    assert response.status_code == 200, response.json()
    assert response.json()["choices"][0]["message"]["content"] == _direct(
        lively_base_model, adapter, HELLO, 6
    )


def test_streaming_sends_chunks_usage_and_done(api: Any, lively_base_model: Any) -> None:
    """stream=true sends a role chunk, content deltas, a finish chunk, usage, then [DONE]."""
    response = _chat(
        api,
        model="lively",
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert response["content-type"].startswith("text/event-stream")
    chunks = _sse(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == _direct(lively_base_model, None, HELLO, 8)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_n_choices_and_stop_sequences(api: Any, lively_base_model: Any) -> None:
    """n returns that many choices; a stop sequence never appears in the text."""
    body = _chat(api, model="lively", n=2, seed=3, max_tokens=10, temperature=1.0).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    full = _chat(api, model="lively", temperature=0, max_tokens=12).json()
    text = full["choices"][0]["message"]["content"]
    if len(text) > 3:
        stop = text[2:4]
        cut = _chat(api, model="lively", temperature=0, max_tokens=12, stop=[stop]).json()
        choice = cut["choices"][0]
        assert stop not in choice["message"]["content"]
        assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 50}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_chat_requests_name_their_param(
    api: Any, lively_base_model: Any, body: dict[str, Any], param: str
) -> None:
    """Each invalid field is a 400 whose ``param`` names it."""
    response = api.post(
        "/v1/chat/completions", {"model": "lively", "messages": HELLO, **body}, format="json"
    )
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param


def test_a_prompt_over_the_context_window_is_refused(api: Any, lively_base_model: Any) -> None:
    """A prompt longer than the base's context is a 400 context_length_exceeded."""
    messages = [{"role": "user", "content": "word " * 400}]
    response = api.post(
        "/v1/chat/completions", {"model": "lively", "messages": messages}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "messages"


def test_replacing_an_adapter_artifact_changes_what_is_served(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """A new artifact (new sha256) for the same adapter is served at once, never stale."""
    from customization.base_model import load_base_model
    from customization.checkpoint import save_carry_on
    from tests.helpers.carry_on_kit import new_carry_on, perturb, tiny_config
    from webapp.core.utils import data_path

    adapter = make_adapter(user, lively_base_model, seed=1)
    before = _chat(api, model=adapter.name, temperature=0, max_tokens=12).json()
    frozen = load_base_model(lively_base_model.path, name="lively")
    replacement = perturb(new_carry_on(frozen, tiny_config(), seed=9), seed=9)
    info = save_carry_on(
        replacement, data_path(adapter.path), base_fingerprints=[frozen.fingerprint()]
    )
    adapter.sha256 = info.sha256
    adapter.save(update_fields=["sha256"])
    after = _chat(api, model=adapter.name, temperature=0, max_tokens=12).json()
    text = after["choices"][0]["message"]["content"]
    assert text != before["choices"][0]["message"]["content"]
    assert text == _direct(lively_base_model, adapter, HELLO, 12)


def test_a_corrupted_adapter_artifact_is_refused_with_a_clear_error(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """Bytes changed on disk (sha256 mismatch) are refused at load, not served."""
    from webapp.core.utils import data_path

    adapter = make_adapter(user, lively_base_model, seed=1)
    weights = data_path(adapter.path) / "carry_on.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    response = _chat(api, model=adapter.name, max_tokens=4)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "sha256" in error["message"]
