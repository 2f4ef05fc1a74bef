"""Training benchmark: carry-on vs PEFT LoRA on SmolLM2-135M-Instruct and GSM8K (issue 5.1).

    .venv/bin/python -m bench.train_bench            # the full run
    .venv/bin/python -m bench.train_bench --quick    # a smoke-sized run (minutes)

Writes ``train.json``, ``train.md`` and ``train_loss_vs_time.png`` into ``--out``
(default ``bench/results/``). Every training run happens in its own process (peak RSS per
run); each runs once, so per-epoch figures are medians over its epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    machine_info,
    median,
    ratio,
    resolve_base,
    run_child,
    set_threads,
    target_line,
    write_results,
)
from bench.lora import LORA_TARGETS
from bench.train_report import markdown, plot_curves

FULL = {"train_problems": 512, "held_out_problems": 128, "max_length": 320, "epochs": 3}
QUICK = {"train_problems": 64, "held_out_problems": 16, "max_length": 256, "epochs": 1}
CARRY_ONS = {"carry-on": {}, "carry-on-4x256": {"d_model": 256, "n_blocks": 4}}
CHILD = "bench.train_runs"


def _log(message: str) -> None:
    print(f"[train_bench] {message}", file=sys.stderr, flush=True)


def _spec(args: argparse.Namespace, work: Path, base_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "threads": args.threads,
        "base_dir": str(base_dir),
        "gsm8k": args.gsm8k,
        "n_train": args.train_problems,
        "n_held_out": args.held_out_problems,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "cache_dir": str(work / "features"),
        **extra,
    }


def _summarize(run: dict[str, Any], n_tokens: int, n_targets: int) -> dict[str, Any]:
    """Per-epoch throughput and the medians the targets compare."""
    for epoch in run["epochs"]:
        epoch["tokens_per_second"] = n_tokens / epoch["epoch_seconds"]
        epoch["target_tokens_per_second"] = n_targets / epoch["epoch_seconds"]
    seconds = [e["epoch_seconds"] for e in run["epochs"]]
    run["median_epoch_seconds"] = median(seconds)
    run["median_tokens_per_second"] = median([e["tokens_per_second"] for e in run["epochs"]])
    run["training_seconds"] = sum(seconds)
    return run


def _curve(start: float, base_loss: float, run: dict[str, Any]) -> list[list[float]]:
    """(wall-clock seconds since the job began, held-out loss), evaluation time excluded."""
    points, elapsed = [[start, base_loss]], start
    for epoch in run["epochs"]:
        elapsed += epoch["epoch_seconds"]
        points.append([elapsed, epoch["valid_loss"]])
    return points


def _run_all(args: argparse.Namespace, work: Path, base_dir: Path) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    _log("extraction (the first job's base forward) ...")
    extraction = run_child(CHILD, _spec(args, work, base_dir, kind="extract"), work_dir=work)
    shared = {k: extraction[k] for k in ("train_dir", "held_out_dir", "fingerprint")}
    for name, overrides in CARRY_ONS.items():
        _log(f"{name} training ...")
        spec = _spec(
            args,
            work,
            base_dir,
            kind="carry_on",
            carry_on=overrides,
            out_dir=str(work / name),
            **shared,
        )
        runs[name] = run_child(CHILD, spec, work_dir=work)
    _log("second job on the same data (feature cache hit) ...")
    spec = _spec(args, work, base_dir, kind="cache_hit", carry_on={}, out_dir=str(work / "hit"))
    cache_hit = run_child(CHILD, spec, work_dir=work)
    for name in args.lora:
        _log(f"{name} training through the base ...")
        spec = _spec(args, work, base_dir, kind="lora", lora=name, out_dir=str(work / name))
        runs[name] = run_child(CHILD, spec, work_dir=work)
    return {"extraction": extraction, "runs": runs, "cache_hit_job": cache_hit}


def _analyse(measured: dict[str, Any], epochs: int) -> dict[str, Any]:
    extraction, runs = measured["extraction"], measured["runs"]
    n_tokens, n_targets = extraction["n_tokens"], extraction["n_target_tokens"]
    base_loss = runs["carry-on"]["base_held_out_loss"]
    curves = {}
    for name, run in runs.items():
        _summarize(run, n_tokens, n_targets)
        start = run["setup_seconds"]
        if name in CARRY_ONS:
            start += extraction["job_seconds"]
            run["first_job_seconds"] = start + run["training_seconds"] + run["save_seconds"]
        curves[name] = _curve(start, base_loss, run)
    ours, lora = runs["carry-on"], runs.get("lora-qv")
    lora_epoch = lora["median_epoch_seconds"] if lora else None
    lora_train = lora["training_seconds"] if lora else None
    ratios = {
        f"{name}_epoch_vs_lora_qv": ratio(run["median_epoch_seconds"], lora_epoch)
        for name, run in runs.items()
    }
    ratios.update(
        carry_on_peak_rss_vs_lora_qv=ratio(
            ours["peak_rss_bytes"], lora["peak_rss_bytes"] if lora else None
        ),
        first_job_vs_lora_qv_epochs=ratio(ours["first_job_seconds"], lora_train),
        cache_hit_job_vs_lora_qv_epochs=ratio(measured["cache_hit_job"]["job_seconds"], lora_train),
    )
    targets = [
        target_line(
            "carry-on epoch time / LoRA q/v epoch time",
            ratios["carry-on_epoch_vs_lora_qv"],
            0.2,
            at_most=True,
        ),
        target_line(
            "carry-on peak RSS / LoRA q/v peak RSS",
            ratios["carry_on_peak_rss_vs_lora_qv"],
            0.4,
            at_most=True,
        ),
        target_line(
            f"first job (extraction + {epochs} epochs) / LoRA q/v {epochs} epochs",
            ratios["first_job_vs_lora_qv_epochs"],
            0.4,
            at_most=True,
        ),
        target_line(
            f"cache-hit job / LoRA q/v {epochs} epochs",
            ratios["cache_hit_job_vs_lora_qv_epochs"],
            0.2,
            at_most=True,
        ),
    ]
    return {"base_held_out_loss": base_loss, "curves": curves, "ratios": ratios, "targets": targets}


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    base_dir = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        machine = machine_info(args.threads)
        measured = _run_all(args, work, base_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {
        "mode": "quick" if args.quick else "full",
        "base": base_dir.name,
        "data_source": measured["extraction"]["data_source"],
        "train_problems": args.train_problems,
        "held_out_problems": args.held_out_problems,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "carry_on_learning_rate": measured["runs"]["carry-on"]["learning_rate"],
        "lora_learning_rate": next(
            (r["learning_rate"] for n, r in measured["runs"].items() if n in LORA_TARGETS), None
        ),
        "full_spec": FULL,
        "notes": args.note,
    }
    return {
        "benchmark": "train",
        "machine": machine,
        "settings": settings,
        **measured,
        **_analyse(measured, args.epochs),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer, shorter")
    parser.add_argument("--base", help="base model folder (default: the bundled SmolLM2)")
    parser.add_argument("--gsm8k", help="GSM8K train.jsonl (default: ../shared/data/gsm8k/)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-problems", type=int)
    parser.add_argument("--held-out-problems", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", type=Path, help="only re-render this result file")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--lora", nargs="*", default=list(LORA_TARGETS), choices=list(LORA_TARGETS))
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:  # re-render the report of an earlier run
        result = json.loads(args.from_json.read_text("utf-8"))
        result["settings"]["notes"] = [*result["settings"].get("notes", []), *args.note]
    else:
        result = run(args)
    image = plot_curves(result, args.out / "train_loss_vs_time.png")
    result["plot"] = image.name if image else None
    for path in write_results(args.out, "train", result, markdown(result)):
        _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
