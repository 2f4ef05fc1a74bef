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
tuned LoRA's best loss, ``best`` the one closest to it. Where a side-by-side timing exists
(``--timing``), only the runs it covers are compared on time (Pareto front, ``balanced``).

    python -m bench.presets_bench --quick            # smoke size (minutes)
    python -m bench.presets_bench                    # 512 training / 128 held-out problems
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    bench_parser,
    child_spec,
    fmt,
    load_problems,
    machine_info,
    machine_markdown,
    md_table,
    median,
    parse_sized,
    resolve_base,
    run_child,
    write_json,
    write_results,
)
from customization.config import default_taps

CHILD = "bench.train_runs"
FULL = {
    "train_problems": 512,
    "held_out_problems": 128,
    "max_length": 320,
    "epochs": 3,
    "depths": "16,12,L,8,4,2",
    "tail_lrs": "2e-3",
    "lora_lrs": "2e-3,1e-3,5e-4,2e-4",
    "extra": "tail:12:2e-3:8:1,tail:10:2e-3:8,tail:12:1e-3:8,tail:12:2e-3:16",
    "timing_problems": 64,
    "timing_depths": "16,12,10,L",
}
QUICK = {
    "train_problems": 16,
    "held_out_problems": 8,
    "max_length": 320,
    "epochs": 1,
    "depths": "1,L",
    "tail_lrs": "2e-3",
    "lora_lrs": "1e-3",
    "extra": "",
    "timing_problems": 8,
    "timing_depths": "1,L",
}


def _log(message: str) -> None:
    print(f"[presets_bench] {message}", file=sys.stderr, flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _depth(text: str, num_layers: int) -> int:
    return num_layers if text == "L" else int(text)


@dataclass(frozen=True)
class Run:
    """One configuration of the sweep: its kind, depth (tails), learning rate, rank and,
    where it is not the sweep's, its own number of epochs (the schedule decays over them)."""

    kind: str  # "carry_on", "tail" or "lora"
    learning_rate: float | None = None
    depth: int | None = None
    rank: int = 8
    epochs: int | None = None

    @property
    def run_id(self) -> str:
        if self.kind == "tail":
            epochs = f"-ep{self.epochs}" if self.epochs else ""
            return f"tail-k{self.depth}-r{self.rank}-lr{self.learning_rate:g}{epochs}"
        if self.kind == "lora":
            return f"lora-all-lr{self.learning_rate:g}"
        return "carry-on"

    @property
    def name(self) -> str:
        if self.kind == "tail":
            rank = "" if self.rank == 8 else f" r={self.rank}"
            epochs = "" if not self.epochs else f", {self.epochs} epoch{'s' * (self.epochs > 1)}"
            return f"tail k={self.depth}{rank}{epochs}"
        return {"lora": "PEFT LoRA all-linear", "carry_on": "carry-on (fast)"}[self.kind]


def plan(args: argparse.Namespace, num_layers: int) -> list[Run]:
    """The sweep in the order it runs: the likely presets and the tuned peer first, so a
    run cut short (the full sweep takes hours on two cores) has measured what matters."""
    depths = [_depth(x, num_layers) for x in args.depths.split(",") if x]
    tails = [Run("tail", lr, d) for d in depths for lr in _floats(args.tail_lrs)]
    loras = [Run("lora", lr) for lr in _floats(args.lora_lrs)]
    extra = []
    for item in (x for x in args.extra.split(",") if x):  # tail:depth:lr:rank[:epochs]
        _, depth, lr, rank, *epochs = item.split(":")
        extra.append(
            Run("tail", float(lr), _depth(depth, num_layers), int(rank), *map(int, epochs))
        )
    # Interleave: LoRA's likely best rate, the deep tails, then the rest.
    head, rest = loras[:1] + tails[:3], loras[1:2] + tails[3:] + [Run("carry_on")]
    return head + rest + extra + loras[2:]


def _spec(args: argparse.Namespace, work: Path, base_dir: Path, **extra: Any) -> dict[str, Any]:
    return child_spec(args, work, base_dir, **({"batch_size": 8, "seed": 0} | extra))


def _run_spec(run: Run, args: argparse.Namespace, work: Path, base_dir: Path) -> dict[str, Any]:
    out = {"out_dir": str(work / run.run_id)}
    if run.kind == "lora":
        return _spec(
            args,
            work,
            base_dir,
            kind="lora",
            lora="lora-all",
            learning_rate=run.learning_rate,
            **out,
        )
    if run.kind == "tail":
        return _spec(
            args,
            work,
            base_dir,
            kind="tail",
            learning_rate=run.learning_rate,
            tail={"depth": run.depth, "rank": run.rank},
            **out,
            **({"epochs": run.epochs} if run.epochs else {}),
        )
    return _spec(args, work, base_dir, kind="carry_on", carry_on={}, **out)


def _summary(run: Run, record: dict[str, Any]) -> dict[str, Any]:
    """Best epoch (keep-best), the training time to it and the process's peak RSS."""
    result = record["result"]
    losses = [e["valid_loss"] for e in result["epochs"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    epochs = result["epochs"][: best + 1]
    return {
        "run_id": run.run_id,
        "name": run.name,
        "kind": run.kind,
        "depth": run.depth,
        "rank": run.rank,
        "learning_rate": result["learning_rate"],
        "losses": losses,
        "best_loss": losses[best],
        "best_epoch": best + 1,
        "seconds_to_best": result["setup_seconds"]
        + sum(e["epoch_seconds"] for e in epochs)
        + result["save_seconds"],
        "peak_rss_bytes": result["peak_rss_bytes"],
        "trainable_parameters": result["trainable_parameters"],
        "cpu_share_others": result["cpu_share_others"],
        "extraction_seconds": record.get("extraction_seconds") or 0.0,
    }


def _sized(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs comparable: a stored run is reused only at the same size and on
    the same problems (their source and a digest of their bytes, not the file's path: a
    sitting whose GSM8K file is missing falls back to generated problems)."""
    keys = ("train_problems", "held_out_problems", "max_length", "epochs", "threads")
    problems = load_problems(args.gsm8k, args.train_problems, args.held_out_problems)
    digest = hashlib.sha256(problems.train + b"\0" + problems.held_out).hexdigest()
    return {k: getattr(args, k) for k in keys} | {
        "data": problems.source,
        "data_sha256": digest,
    }


def _stored(folder: Path, run: Run, sized: dict[str, Any]) -> dict[str, Any] | None:
    path = folder / f"{run.run_id}.json"
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return record if record.get("sized") == sized else None


def _extraction(args: argparse.Namespace, work: Path, base_dir: Path, taps: list[int]) -> Any:
    _log(f"extraction of states {taps} (one base forward for every run below) ...")
    return run_child(CHILD, _spec(args, work, base_dir, kind="extract", taps=taps), work_dir=work)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every planned run not already stored in ``args.runs``; each result is stored as soon as
    it is measured, so the sweep resumes where it stopped (``--max-runs`` bounds a sitting)."""
    base_dir = resolve_base(args.base)
    num_layers = int(json.loads((base_dir / "config.json").read_text())["num_hidden_layers"])
    runs = plan(args, num_layers)
    sized = _sized(args)
    _log(f"problems: {sized['data']}")
    folder: Path = args.runs
    folder.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if _stored(folder, r, sized) is None][: args.max_runs]
    taps = sorted(
        {t % (num_layers + 1) for t in default_taps(num_layers)}
        | {num_layers - r.depth for r in runs if r.depth}
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="presets-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    extraction = None
    for item in todo:
        spec = _run_spec(item, args, work, base_dir)
        if item.kind != "lora":
            if extraction is None:
                extraction = _extraction(args, work, base_dir, taps)
            spec |= {k: extraction[k] for k in ("train_dir", "held_out_dir", "fingerprint")}
        _log(f"{item.run_id} ...")
        result = run_child(CHILD, spec, work_dir=work)
        record = {
            "sized": sized,
            "machine": machine_info(args.threads),
            "extraction_seconds": extraction and extraction["job_seconds"],
            "result": result,
        }
        write_json(folder / f"{item.run_id}.json", record)
        _log(
            f"{item.run_id}: held-out loss per epoch {[e['valid_loss'] for e in result['epochs']]}"
        )
    done = [(r, _stored(folder, r, sized)) for r in runs]
    summaries = [_summary(r, record) for r, record in done if record]
    timing = _stored_timing(folder, sized)
    return {
        "machine": machine_info(args.threads),
        "args": {k: str(v) for k, v in vars(args).items()},
        "planned": [r.run_id for r in runs],
        "missing": [r.run_id for r, record in done if not record],
        "runs": summaries,
        "timing": timing,
        "analysis": analyse(summaries, timing) if summaries else None,
    }


# -- timing: side by side, on a quiet machine ------------------------------------------------


def timing(args: argparse.Namespace, rounds: int = 3) -> dict[str, Any]:
    """Wall time of the likely picks against tuned LoRA's, measured side by side.

    The loss runs take hours and other work may share the cores meanwhile, so their clocks
    are not compared. Here each candidate trains one epoch on the same ``timing_problems``
    subset, the candidates interleaved (A B C, A B C, ...) for ``rounds`` rounds; the median
    epoch of each gives the time ratios. Extraction is timed for each tail's own state (what
    its first job runs: the base below the tail, once).
    """
    base_dir = resolve_base(args.base)
    num_layers = int(json.loads((base_dir / "config.json").read_text())["num_hidden_layers"])
    wanted = {_depth(x, num_layers) for x in args.timing_depths.split(",")}
    candidates = [
        r
        for r in plan(args, num_layers)
        if (r.kind == "carry_on" or r.depth in wanted) and r.rank == 8
    ]
    candidates = list({(r.kind, r.depth): r for r in candidates}.values())
    peer = Run("lora", _floats(args.lora_lrs)[0])
    small = argparse.Namespace(
        **{
            **vars(args),
            "train_problems": args.timing_problems,
            "held_out_problems": 4,
            "epochs": 1,
        }
    )
    work = Path(tempfile.mkdtemp(prefix="presets-timing-"))
    epochs: dict[str, list[float]] = {}
    extraction_seconds: dict[str, float] = {}
    features: dict[str, dict[str, Any]] = {}
    for item in candidates:  # each tail's own state, timed as its first job would run it
        (work / item.run_id).mkdir(parents=True)
        taps = [num_layers - item.depth] if item.depth else list(default_taps(num_layers))
        extraction = _extraction(small, work / item.run_id, base_dir, taps)
        extraction_seconds[item.run_id] = extraction["job_seconds"]
        features[item.run_id] = {
            k: extraction[k] for k in ("train_dir", "held_out_dir", "fingerprint")
        }
    (work / peer.run_id).mkdir()
    for _ in range(rounds):
        for item in [peer, *candidates]:
            spec = _run_spec(item, small, work / item.run_id, base_dir)
            spec |= features.get(item.run_id, {})
            result = run_child(CHILD, spec, work_dir=work / item.run_id)
            epochs.setdefault(item.run_id, []).append(result["epochs"][0]["epoch_seconds"])
            _log(f"timing {item.run_id}: {epochs[item.run_id][-1]:.1f} s")
    record = {
        "sized": _sized(args),
        "machine": machine_info(args.threads),
        "timing_problems": args.timing_problems,
        "peer": peer.run_id,
        "epoch_seconds": {k: median(v) for k, v in epochs.items()},
        "epoch_seconds_all": epochs,
        "extraction_seconds": extraction_seconds,
    }
    write_json(args.runs / "timing.json", record)
    return record


def _stored_timing(folder: Path, sized: dict[str, Any]) -> dict[str, Any] | None:
    path = folder / "timing.json"
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return record if record.get("sized") == sized else None


def _shape(run_id: str) -> str:
    """A run's id without its learning rate: ``tail-k16-r8``, ``lora-all``."""
    return run_id.rsplit("-lr", 1)[0]


def _times(r: dict[str, Any], lora: dict[str, Any], timing: dict[str, Any] | None) -> None:
    """Time ratios against tuned LoRA's time to its best epoch: from the side-by-side
    timing where it covers the run, else from the loss runs' own clocks (marked)."""
    # The learning rate does not change the time: timings are matched by shape.
    measured = {_shape(k): v for k, v in (timing["epoch_seconds"] if timing else {}).items()}
    extraction = {_shape(k): v for k, v in (timing or {}).get("extraction_seconds", {}).items()}
    mine = _shape(r["run_id"])
    if timing and mine in measured and _shape(timing["peer"]) in measured:
        peer = lora["best_epoch"] * measured[_shape(timing["peer"])]
        train = r["best_epoch"] * measured[mine] if r["kind"] != "lora" else peer
        extract = extraction.get(mine, 0.0)
        r["time_source"] = "side by side"
    else:
        peer, train = lora["seconds_to_best"], r["seconds_to_best"]
        extract = 0.0 if r["kind"] == "lora" else r.get("extraction_seconds", 0.0)
        r["time_source"] = "own clock"
    r["cache_hit_ratio"] = train / peer
    r["first_job_ratio"] = (train + extract) / peer


def analyse(runs: Sequence[dict[str, Any]], timing: dict[str, Any] | None) -> dict[str, Any]:
    """Tuned LoRA's best, ratios against it, the Pareto front and the presets' picks."""
    loras = [r for r in runs if r["kind"] == "lora"]
    if not loras:
        return {"tuned_lora": None, "balanced": None, "best": None}
    lora = min(loras, key=lambda r: r["best_loss"])
    for r in runs:
        r["loss_ratio"] = r["best_loss"] / lora["best_loss"]
        r["rss_ratio"] = r["peak_rss_bytes"] / lora["peak_rss_bytes"]
        _times(r, lora, timing)
    # Times compare only where they were measured alike: where a side-by-side timing
    # exists, among the runs it covers (LoRA included); a run's own clock against LoRA's is
    # skewed by whatever else ran during either (tail k=L's own clock once read 0.44x
    # LoRA's for the same work).
    timed = [
        r for r in runs if not timing or r["kind"] == "lora" or r["time_source"] == "side by side"
    ]
    for r in runs:
        r["pareto"] = any(r is t for t in timed) and not any(
            o["first_job_ratio"] < r["first_job_ratio"] and o["best_loss"] < r["best_loss"]
            for o in timed
        )
    ours = [r for r in runs if r["kind"] != "lora"]
    within = [r for r in timed if r["kind"] != "lora" and r["loss_ratio"] <= 1.10]
    balanced = min(within, key=lambda r: r["first_job_ratio"]) if within else None
    best = min(ours, key=lambda r: r["best_loss"]) if ours else None
    keys = (
        "name",
        "depth",
        "rank",
        "learning_rate",
        "loss_ratio",
        "first_job_ratio",
        "cache_hit_ratio",
        "rss_ratio",
    )
    return {
        "tuned_lora": {k: lora[k] for k in ("learning_rate", "best_loss", "best_epoch")},
        "balanced": balanced and {k: balanced[k] for k in keys},
        "best": best and {k: best[k] for k in keys},
    }


def _timed_on(timing: dict[str, Any]) -> str:
    """Where the side-by-side timing ran (a report may be written on another machine)."""
    machine = timing.get("machine") or {}
    if not machine:
        return ""
    return f" ({machine.get('cpu', 'unknown CPU')}, commit {machine.get('git_commit', '?')})"


def markdown(result: dict[str, Any]) -> str:
    analysis = result["analysis"] or {}
    rows = [
        [
            r["name"],
            f"{r['learning_rate']:g}",
            " / ".join(fmt(x, 3) for x in r["losses"]),
            f"**{r['best_loss']:.4f}** (ep {r['best_epoch']})",
            fmt(r.get("loss_ratio"), 3),
            fmt(r.get("first_job_ratio")),
            fmt(r.get("cache_hit_ratio")),
            r.get("time_source", ""),
            fmt(r["peak_rss_bytes"] / 1e9),
            fmt(r.get("rss_ratio")),
            "yes" if r.get("pareto") else "",
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
            "loss vs tuned LoRA",
            "first job vs LoRA",
            "cache-hit job vs LoRA",
            "time from",
            "peak RSS GB",
            "RSS vs LoRA",
            "Pareto",
            "CPU used by others",
        ],
        rows,
    )
    timing = result["timing"]
    timing_text = (
        f"Times: each candidate's epoch on the same {timing['timing_problems']} problems, "
        f"interleaved, median of {len(next(iter(timing['epoch_seconds_all'].values())))} "
        f"rounds{_timed_on(timing)}: "
        f"{', '.join(f'{k} {v:.1f} s' for k, v in timing['epoch_seconds'].items())}; "
        f"extraction of each tail's own state on the same problems: "
        f"{', '.join(f'{k} {v:.1f} s' for k, v in timing['extraction_seconds'].items())}.\n\n"
        if timing
        else "No side-by-side timing stored yet: times are the loss runs' own clocks.\n\n"
    )
    missing = result["missing"]
    return (
        "# Presets benchmark (tails against tuned LoRA)\n\n"
        f"Written by `python -m bench.presets_bench`; {__doc__.splitlines()[0]}\n\n"
        + machine_markdown(result["machine"])
        + (
            f"\n**Not yet run** (the sweep resumes with them): {', '.join(missing)}.\n"
            if missing
            else ""
        )
        + "\n"
        + timing_text
        + table
        + (
            '\n\nA run timed only by its own clock ("own clock") is shown but not compared '
            "on time: it is on no Pareto front and cannot be `balanced` until `--timing` "
            "covers it."
            if result.get("timing")
            else ""
        )
        + f"\n\nTuned LoRA: {analysis.get('tuned_lora')}.\n\nPicks: balanced = "
        f"{analysis.get('balanced')}; best = {analysis.get('best')}.\n"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in result["runs"]:
        if "first_job_ratio" not in r:
            continue
        marker = {"lora": "s", "tail": "o", "carry_on": "^"}[r["kind"]]
        axes.scatter(r["first_job_ratio"], r["best_loss"], marker=marker)
        axes.annotate(
            f"{r['name']} {r['learning_rate']:g}",
            (r["first_job_ratio"], r["best_loss"]),
            fontsize=7,
        )
    axes.set_xlabel("first job's time to its best epoch / tuned LoRA's")
    axes.set_ylabel("best held-out loss")
    axes.set_title("Tails vs tuned PEFT LoRA (Pareto)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.presets_bench", __doc__, "smoke size: 16/8 problems, 1 epoch")
    sizes = ("train_problems", "held_out_problems", "max_length", "epochs", "timing_problems")
    for option in FULL:
        parser.add_argument(
            f"--{option.replace('_', '-')}", default=None, type=int if option in sizes else str
        )
    parser.add_argument(
        "--runs",
        type=Path,
        help="where each run's result is kept "
        "(default: <out>/presets_runs, or a temporary folder with --quick)",
    )
    parser.add_argument("--work", help="scratch folder for features and artifacts")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="only measure the side-by-side timing (needs a quiet machine)",
    )
    args = parse_sized(parser, argv, full=FULL, quick=QUICK)
    if args.runs is None:
        args.runs = Path(tempfile.mkdtemp()) if args.quick else args.out / "presets_runs"
    if args.timing:
        timing(args, rounds=1 if args.quick else 3)
        args.max_runs = 0  # then only the report, from the stored runs
    result = run(args)
    name = "presets_quick" if args.quick else "presets"
    write_results(args.out, name, result, markdown(result))
    plot(result, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
