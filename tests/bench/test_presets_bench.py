"""The presets benchmark: its picks from given runs, and the harness at toy size (it resumes).

Correctness of the harness only; nothing here asserts anything about speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.presets_bench import FULL, _run_spec, analyse, plan


def _run(run_id: str, kind: str, loss: float, seconds: float, rss: float, **extra: Any) -> dict:
    return {
        "run_id": run_id,
        "kind": kind,
        "name": run_id,
        "best_loss": loss,
        "best_epoch": 2,
        "seconds_to_best": seconds,
        "peak_rss_bytes": rss,
        "extraction_seconds": 10.0,
        "depth": extra.get("depth"),
        "rank": 8,
        "learning_rate": 2e-3,
    }


def test_balanced_is_the_cheapest_within_ten_percent_and_best_the_closest() -> None:
    runs = [
        _run("lora-a", "lora", 1.00, 100.0, 10.0),
        _run("lora-b", "lora", 0.90, 100.0, 10.0),  # tuned LoRA: the better rate
        _run("k2", "tail", 1.20, 10.0, 2.0, depth=2),  # cheapest, but 1.33x
        _run("k8", "tail", 0.98, 40.0, 4.0, depth=8),  # 1.089x: within 10 %
        _run("k16", "tail", 0.95, 60.0, 6.0, depth=16),
        _run("kL", "tail", 0.905, 95.0, 9.0, depth=30),
    ]
    result = analyse(runs, timing=None)
    assert result["tuned_lora"]["best_loss"] == 0.90
    assert result["balanced"]["name"] == "k8"
    assert result["best"]["name"] == "kL"
    k8 = next(r for r in runs if r["name"] == "k8")
    assert k8["cache_hit_ratio"] == 0.4
    assert k8["first_job_ratio"] == 0.5
    assert k8["rss_ratio"] == 0.4
    assert k8["time_source"] == "own clock"


def test_an_extra_run_may_train_for_its_own_number_of_epochs() -> None:
    """``tail:depth:lr:rank:epochs`` is a run of its own (id and name say so) whose child
    trains that many epochs, its schedule decaying over them; without the fifth field a run
    trains the sweep's epochs."""
    args = argparse.Namespace(
        **FULL | {"extra": "tail:12:2e-3:8:1,tail:16:1e-3:8", "base": None, "gsm8k": None}
    )
    args.threads = 2
    extras = plan(args, num_layers=30)[-4:-2]
    assert [r.run_id for r in extras] == ["tail-k12-r8-lr0.002-ep1", "tail-k16-r8-lr0.001"]
    assert extras[0].name == "tail k=12, 1 epoch"
    one, swept = (_run_spec(r, args, Path("/w"), Path("/b")) for r in extras)
    assert (one["epochs"], one["tail"]) == (1, {"depth": 12, "rank": 8})
    assert swept["epochs"] == FULL["epochs"]


def test_side_by_side_timing_replaces_the_runs_own_clocks() -> None:
    runs = [
        _run("lora-all-lr0.002", "lora", 0.90, 999.0, 10.0),
        _run("tail-k16", "tail", 0.95, 1.0, 6.0, depth=16),
    ]
    timing = {
        "peer": "lora-all-lr0.002",
        "epoch_seconds": {"lora-all-lr0.002": 50.0, "tail-k16": 25.0},
        "extraction_seconds": {"tail-k16": 5.0},
    }
    analyse(runs, timing)
    tail = runs[1]
    assert tail["time_source"] == "side by side"
    assert tail["cache_hit_ratio"] == 0.5  # 2 epochs x 25 s / 2 epochs x 50 s
    assert tail["first_job_ratio"] == 0.55  # (50 + 5) / 100


def test_only_runs_timed_side_by_side_compete_for_balanced() -> None:
    """A run whose time is only its own clock (LoRA's own clock was slowed by other work)
    cannot be picked as the cheapest; it still counts for best, which is about loss."""
    runs = [
        _run("lora-all-lr0.002", "lora", 0.90, 999.0, 10.0),
        _run("tail-k12", "tail", 0.97, 1.0, 5.0, depth=12),
        _run("tail-k30", "tail", 0.90, 1.0, 10.0, depth=30),  # not in the timing
    ]
    timing = {
        "peer": "lora-all-lr0.002",
        "epoch_seconds": {"lora-all-lr0.002": 50.0, "tail-k12": 22.0},
        "extraction_seconds": {"tail-k12": 5.0},
    }
    result = analyse(runs, timing)
    assert runs[2]["time_source"] == "own clock"
    assert runs[2]["first_job_ratio"] < runs[1]["first_job_ratio"]  # skewed, so not used
    assert result["balanced"]["name"] == "tail-k12"
    assert result["best"]["name"] == "tail-k30"


def test_the_sweep_stores_each_run_and_resumes(
    tiny_base_dir, toy_problems, tmp_path, restore_threads
) -> None:
    from bench import presets_bench

    runs = tmp_path / "runs"
    argv = [
        "--quick",
        "--base",
        str(tiny_base_dir),
        "--gsm8k",
        str(toy_problems),
        "--out",
        str(tmp_path),
        "--runs",
        str(runs),
        "--train-problems",
        "8",
        "--held-out-problems",
        "4",
        "--max-length",
        "64",
        "--max-runs",
        "2",
    ]
    assert presets_bench.main(argv) == 0
    first = json.loads((tmp_path / "presets_quick.json").read_text("utf-8"))
    assert len(first["runs"]) == 2
    assert first["missing"]
    stored = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert presets_bench.main(argv[:-2]) == 0  # resumes: only the missing runs
    done = json.loads((tmp_path / "presets_quick.json").read_text("utf-8"))
    assert not done["missing"]
    assert len(done["runs"]) == len(done["planned"])
    assert all(runs.joinpath(name).stat().st_mtime_ns == t for name, t in stored.items())
    assert done["analysis"]["best"] is not None
    assert (tmp_path / "presets_quick.png").exists()
