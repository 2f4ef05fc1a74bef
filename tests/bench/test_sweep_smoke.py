"""The carry-on quality sweep at toy size: it extracts once, trains, decodes and reports.

Correctness of the harness only; nothing here asserts anything about speed or quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_sweep_trains_a_variant_on_the_shared_extraction_and_reports_it(
    tiny_base_dir: Path, toy_problems: Path, tmp_path: Path, restore_threads: None
) -> None:
    """One extraction serves every variant; a rerun of another variant merges into the table."""
    from bench import sweep_carry_on

    common = [
        *("--base", str(tiny_base_dir), "--gsm8k", str(toy_problems)),
        *("--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")),
        *("--train", "8", "--heldout", "4", "--max-length", "64", "--threads", "1"),
    ]
    variant = "ladder8-d128k2-lr3e-3"
    argv = [*common, "--variants", variant, "--decode", variant, "--exact-match", "base"]
    assert sweep_carry_on.main([*argv, "--max-new-tokens", "4"]) == 0
    assert sweep_carry_on.main([*common, "--variants", "final-d128k2"]) == 0
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


def test_a_tail_starts_as_the_base_and_trains_on_the_cached_states(
    tiny_base_dir: Path, toy_problems: Path, tmp_path: Path, restore_threads: None
) -> None:
    """The base-initialised tail re-runs the top layers from a cached state: before training
    it reproduces the base's held-out loss, and it saves only its LoRA weights."""
    from bench import sweep_carry_on

    variant = "tail2-lora-lr2e-3"
    argv = [
        *("--base", str(tiny_base_dir), "--gsm8k", str(toy_problems)),
        *("--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")),
        *("--train", "8", "--heldout", "4", "--max-length", "64", "--threads", "1"),
        *("--variants", variant),
    ]
    assert sweep_carry_on.main(argv) == 0
    size = json.loads((tmp_path / "results" / "sweep.json").read_text("utf-8"))["sizes"]["8x4"]
    tail = size["runs"][variant]
    assert abs(tail["init_valid_loss"] - size["extraction"]["base_held_out_loss"]) < 1e-4
    assert len(tail["epochs"]) == 3
    assert tail["best_valid_loss"] == min(e["valid_loss"] for e in tail["epochs"])
    assert 0 < tail["artifact_bytes"] < 4 * tail["parameters"] + 100_000  # LoRA only
    with_decode = [*argv[:-2], "--variants", variant, "--decode", variant]
    with pytest.raises(SystemExit) as refused:  # a tail is a loss study: it does not decode
        sweep_carry_on.main(with_decode)
    assert refused.value.code == 2
