"""Shared by the benchmark smoke tests: a deep tiny base, toy problems, torch threads."""

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
