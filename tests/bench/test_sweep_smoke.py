"""The carry-on quality sweep at toy size: it extracts once, trains, decodes and reports.

Correctness of the harness only; nothing here asserts anything about speed or quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from customization.tokenizer import CHATML_TEMPLATE
from tests.helpers.tiny_models import tiny_base


@pytest.fixture(scope="module")
def deep_tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama as deep as SmolLM2, so the sweep's taps (up to layer 27) exist."""
    folder = tmp_path_factory.mktemp("tiny-base")
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


@pytest.fixture
def problems(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [
        {"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    return path


def test_sweep_trains_a_variant_on_the_shared_extraction_and_reports_it(
    deep_tiny_base_dir: Path, problems: Path, tmp_path: Path
) -> None:
    """One extraction serves every variant; a rerun of another variant merges into the table."""
    import torch

    from bench import sweep_carry_on

    threads = torch.get_num_threads()
    common = [
        *("--base", str(deep_tiny_base_dir), "--gsm8k", str(problems)),
        *("--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")),
        *("--train", "8", "--heldout", "4", "--max-length", "64", "--threads", "1"),
    ]
    try:
        variant = "ladder8-d128k2-lr3e-3"
        argv = [*common, "--variants", variant, "--decode", variant, "--exact-match", "base"]
        assert sweep_carry_on.main([*argv, "--max-new-tokens", "4"]) == 0
        assert sweep_carry_on.main([*common, "--variants", "final-d128k2"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "results" / "sweep.json").read_text("utf-8"))
    size = result["sizes"]["8x4"]
    assert set(size["runs"]) == {variant, "final-d128k2"}
    ladder = size["runs"][variant]
    assert len(ladder["epochs"]) == 3
    assert ladder["n_states"] == 8  # 8 taps, the final state among them
    assert size["runs"]["final-d128k2"]["n_states"] == 1
    assert ladder["feature_bytes"] > size["runs"]["final-d128k2"]["feature_bytes"]
    assert size["extraction"]["train"]["n_states"] == len(sweep_carry_on.SUPERSET)
    assert size["decode"]["variant"] == variant
    assert 0.0 <= size["exact_match"]["base"]["exact_match"] <= 1.0
    assert f"`{variant}`" in (tmp_path / "results" / "sweep.md").read_text("utf-8")
