"""Which tail depth is worth it: the benchmark that picks the presets (issue 13).

Every run trains through the product's own code path, in its own process so that its peak
RSS is its own: the extraction is ``extract_features`` (the embed task's call), a carry-on
or a tail is ``load_training_node`` + ``train_adapter`` (the train task's calls), and the
peer is PEFT LoRA on all linear layers through the whole base, tuned over its learning rate
(every rate in ``--lora-lrs``, each at its best epoch: keep-best, as our jobs return). All
runs see the same examples, batches, schedule and loss.

For each run the table gives the held-out loss after every epoch, the best, the time to
that best epoch (training only; a first job adds the extraction, a cache-hit job does not),
and the training process's peak RSS; a run is on the Pareto front when no other run is both
faster to its best and better. ``balanced`` is the cheapest configuration within 10 % of
tuned LoRA's best loss, ``best`` the one closest to it.

    python -m bench.presets_bench --quick            # smoke size (minutes)
    python -m bench.presets_bench                    # 512 training / 128 held-out problems
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    bench_parser,
    fmt,
    machine_info,
    machine_markdown,
    md_table,
    parse_sized,
    resolve_base,
    run_child,
    write_results,
)
from customization.config import default_taps

CHILD = "bench.train_runs"
FULL = {
    "train_problems": 512,
    "held_out_problems": 128,
    "max_length": 320,
    "epochs": 3,
    "depths": "2,4,8,12,16,L",
    "tail_lrs": "1e-3,2e-3",
    "lora_lrs": "2e-4,5e-4,1e-3,2e-3",
}
QUICK = {
    "train_problems": 16,
    "held_out_problems": 8,
    "max_length": 320,
    "epochs": 1,
    "depths": "1,L",
    "tail_lrs": "2e-3",
    "lora_lrs": "1e-3",
}


def _log(message: str) -> None:
    print(f"[presets_bench] {message}", file=sys.stderr, flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _depths(text: str, num_layers: int) -> list[int]:
    return [num_layers if x == "L" else int(x) for x in text.split(",") if x]


def _spec(args: argparse.Namespace, work: Path, base_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "threads": args.threads,
        "base_dir": str(base_dir),
        "gsm8k": args.gsm8k,
        "n_train": args.train_problems,
        "n_held_out": args.held_out_problems,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "batch_size": 8,
        "seed": 0,
        "cache_dir": str(work / "features"),
        **extra,
    }


def _summary(name: str, run: dict[str, Any], **shape: Any) -> dict[str, Any]:
    """Best epoch (keep-best), the training time to it and the process's peak RSS."""
    losses = [e["valid_loss"] for e in run["epochs"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    to_best = run["setup_seconds"] + sum(e["epoch_seconds"] for e in run["epochs"][: best + 1])
    return {
        "name": name,
        **shape,
        "learning_rate": run["learning_rate"],
        "losses": losses,
        "best_loss": losses[best],
        "best_epoch": best + 1,
        "seconds_to_best": to_best + run["save_seconds"],
        "peak_rss_bytes": run["peak_rss_bytes"],
        "trainable_parameters": run["trainable_parameters"],
        "cpu_share_others": run["cpu_share_others"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import json

    base_dir = resolve_base(args.base)
    num_layers = int(json.loads((base_dir / "config.json").read_text())["num_hidden_layers"])
    depths = _depths(args.depths, num_layers)
    taps = sorted(
        {t % (num_layers + 1) for t in default_taps(num_layers)} | {num_layers - d for d in depths}
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="presets-bench-") as folder:
        work = Path(folder)
        _log(f"extraction of states {taps} (one base forward for every run below) ...")
        extraction = run_child(
            CHILD, _spec(args, work, base_dir, kind="extract", taps=taps), work_dir=work
        )
        shared = {k: extraction[k] for k in ("train_dir", "held_out_dir", "fingerprint")}
        _log("fast: the default carry-on ...")
        spec = _spec(args, work, base_dir, kind="carry_on", carry_on={}, out_dir=str(work / "c"))
        runs.append(
            _summary(
                "carry-on (fast)",
                run_child(CHILD, {**spec, **shared}, work_dir=work),
                kind="carry_on",
                depth=None,
            )
        )
        for depth in depths:
            for lr in _floats(args.tail_lrs):
                _log(f"tail depth {depth}, lr {lr} ...")
                spec = _spec(
                    args,
                    work,
                    base_dir,
                    kind="tail",
                    tail={"depth": depth},
                    learning_rate=lr,
                    out_dir=str(work / f"tail{depth}-{lr}"),
                    **shared,
                )
                result = run_child(CHILD, spec, work_dir=work)
                runs.append(_summary(f"tail k={depth}", result, kind="tail", depth=depth))
        for lr in _floats(args.lora_lrs):
            _log(f"PEFT LoRA all-linear, lr {lr} ...")
            spec = _spec(
                args,
                work,
                base_dir,
                kind="lora",
                lora="lora-all",
                learning_rate=lr,
                out_dir=str(work / f"lora-{lr}"),
            )
            runs.append(
                _summary(
                    "PEFT LoRA all-linear",
                    run_child(CHILD, spec, work_dir=work),
                    kind="lora",
                    depth=num_layers,
                )
            )
    return {
        "machine": machine_info(args.threads),
        "extraction": extraction,
        "args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "runs": runs,
        "analysis": analyse(runs, extraction["job_seconds"]),
    }


def analyse(runs: Sequence[dict[str, Any]], extraction_seconds: float) -> dict[str, Any]:
    """Tuned LoRA's best, ratios against it, the Pareto front and the presets' picks."""
    lora = min((r for r in runs if r["kind"] == "lora"), key=lambda r: r["best_loss"])
    for r in runs:
        r["loss_ratio"] = r["best_loss"] / lora["best_loss"]
        r["time_ratio"] = r["seconds_to_best"] / lora["seconds_to_best"]
        r["first_job_ratio"] = (
            r["seconds_to_best"] + (0 if r["kind"] == "lora" else extraction_seconds)
        ) / lora["seconds_to_best"]
        r["rss_ratio"] = r["peak_rss_bytes"] / lora["peak_rss_bytes"]
        r["pareto"] = not any(
            o["seconds_to_best"] < r["seconds_to_best"] and o["best_loss"] < r["best_loss"]
            for o in runs
        )
    ours = [r for r in runs if r["kind"] != "lora"]
    within = [r for r in ours if r["loss_ratio"] <= 1.10]
    balanced = min(within, key=lambda r: r["seconds_to_best"]) if within else None
    best = min(ours, key=lambda r: r["best_loss"])
    return {
        "tuned_lora": {k: lora[k] for k in ("learning_rate", "best_loss", "best_epoch")},
        "balanced": balanced and {k: balanced[k] for k in ("name", "depth", "learning_rate")},
        "best": {k: best[k] for k in ("name", "depth", "learning_rate", "loss_ratio")},
    }


def markdown(result: dict[str, Any]) -> str:
    analysis = result["analysis"]
    rows = [
        [
            r["name"],
            r["learning_rate"],
            " / ".join(fmt(x, 3) for x in r["losses"]),
            f"**{r['best_loss']:.4f}** (ep {r['best_epoch']})",
            fmt(r["loss_ratio"]),
            fmt(r["seconds_to_best"], 0),
            fmt(r["first_job_ratio"]),
            fmt(r["peak_rss_bytes"] / 1e9),
            fmt(r["rss_ratio"]),
            "yes" if r["pareto"] else "",
            fmt(r["cpu_share_others"]),
        ]
        for r in result["runs"]
    ]
    table = md_table(
        [
            "run",
            "lr",
            "held-out loss per epoch",
            "best",
            "vs tuned LoRA",
            "s to best",
            "first job vs LoRA",
            "peak RSS GB",
            "RSS vs LoRA",
            "Pareto",
            "CPU used by others",
        ],
        rows,
    )
    return (
        "# Presets benchmark (tails against tuned LoRA)\n\n"
        f"Written by `python -m bench.presets_bench`; {__doc__.splitlines()[0]}\n\n"
        + machine_markdown(result["machine"])
        + f"\nExtraction (first job only): {result['extraction']['job_seconds']:.0f} s.\n\n"
        + table
        + f"\n\nTuned LoRA: lr {analysis['tuned_lora']['learning_rate']}, best held-out loss "
        f"{analysis['tuned_lora']['best_loss']:.4f}. Picks: balanced = {analysis['balanced']}, "
        f"best = {analysis['best']}.\n"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in result["runs"]:
        marker = {"lora": "s", "tail": "o", "carry_on": "^"}[r["kind"]]
        axes.scatter(r["seconds_to_best"], r["best_loss"], marker=marker)
        axes.annotate(
            f"{r['name']} {r['learning_rate']:g}",
            (r["seconds_to_best"], r["best_loss"]),
            fontsize=7,
        )
    axes.set_xlabel("training seconds to the best epoch")
    axes.set_ylabel("best held-out loss")
    axes.set_title("Tails vs tuned PEFT LoRA (Pareto)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.presets_bench", __doc__, "smoke size: 16/8 problems, 1 epoch")
    for option in FULL:
        parser.add_argument(
            f"--{option.replace('_', '-')}",
            default=None,
            type=int
            if option in ("train_problems", "held_out_problems", "max_length", "epochs")
            else str,
        )
    args = parse_sized(parser, argv, full=FULL, quick=QUICK)
    result = run(args)
    name = "presets_quick" if args.quick else "presets"
    write_results(args.out, name, result, markdown(result))
    plot(result, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
