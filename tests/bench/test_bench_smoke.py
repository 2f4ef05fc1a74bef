"""The benchmark harness at toy size: every path runs and writes its results.

Correctness of the harness only; nothing here asserts anything about speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from customization.tokenizer import CHATML_TEMPLATE
from tests.helpers.tiny_models import tiny_base


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as an HF folder, the way ``--base`` expects one."""
    folder = tmp_path_factory.mktemp("tiny-base")
    # As deep as SmolLM2, so default taps chosen for the bundled base exist here too.
    base = tiny_base(seed=0, num_layers=30)
    base.model.save_pretrained(folder, safe_serialization=True)
    base.tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return folder


@pytest.fixture(scope="module")
def toy_problems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Short GSM8K-shaped problems, so the byte-level toy tokenizer keeps them small."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [
        {
            "question": f"What is {i}+{i + 1}?",
            "answer": f"{i}+{i + 1}=<<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}",
        }
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    return path


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_bench_writes_every_run(tiny_base_dir, toy_problems, tmp_path, restore_threads):
    """The training benchmark runs extraction, both carry-ons, the cache hit and a LoRA."""
    from bench import train_bench

    argv = [
        "--quick",
        "--base",
        str(tiny_base_dir),
        "--gsm8k",
        str(toy_problems),
        "--out",
        str(tmp_path),
        "--train-problems",
        "16",
        "--held-out-problems",
        "4",
        "--max-length",
        "64",
        "--epochs",
        "2",
        "--lora",
        "lora-qv",  # lora-all is the same path with more target modules
    ]
    assert train_bench.main(argv) == 0
    result = json.loads((tmp_path / "train.json").read_text("utf-8"))
    assert set(result["runs"]) == {"carry-on", "carry-on-4x256", "lora-qv"}
    for run in result["runs"].values():
        assert len(run["epochs"]) == 2
        assert run["peak_rss_bytes"] > 0
        assert run["artifact_bytes"] > 0
        assert all(e["valid_loss"] is not None for e in run["epochs"])
    assert result["cache_hit_job"]["cache_hit"] is True
    assert len(result["targets"]) == 4
    assert set(result["curves"]) == set(result["runs"])
    assert "# Training benchmark" in (tmp_path / "train.md").read_text("utf-8")


def test_serve_bench_writes_every_comparison(
    tiny_base_dir, toy_problems, tmp_path, restore_threads
):
    """The serving benchmark times every decoding path, the concurrency and cold loads."""
    from bench import serve_bench

    argv = [
        "--quick",
        "--base",
        str(tiny_base_dir),
        "--gsm8k",
        str(toy_problems),
        "--out",
        str(tmp_path),
        "--new-tokens",
        "6",
        "--prompts",
        "2",
        "--adapters",
        "3",
        "--repeats",
        "1",
        "--cold-loads",
        "2",
    ]
    assert serve_bench.main(argv) == 0
    result = json.loads((tmp_path / "serve.json").read_text("utf-8"))
    assert len(result["batch_1"]) == 5
    for figures in result["batch_1"].values():
        # A random toy model may stop at once: the figures exist, whatever their size.
        assert figures["tokens_per_second"] >= 0
        assert figures["ttft_ms"] >= 0
    assert set(result["concurrency"]) == {
        "engine, carry-ons",
        "PEFT, LoRA q/v (adapter_names batch)",
    }
    assert len(result["cold_load_ms"]) == 2
    assert len(result["targets"]) == 3
    assert "# Serving benchmark" in (tmp_path / "serve.md").read_text("utf-8")
