"""Shared benchmark plumbing: machine facts, peak RSS, child runs, data, result files.

Nothing here imports Django or the web app: the benchmarks measure the framework-free core
(``customization``) against PEFT on the same base and data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from customization.durable import replace_durably
from customization.runtime import set_up_torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
DEFAULT_MODELS_DIR = REPO_ROOT / "data" / "base_models"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 10_001  # the demo's held-out seed: never overlaps the training seed 0


# -- machine and measurement -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine_info(threads: int) -> dict[str, Any]:
    """What the figures were measured on: CPU, versions, date, commit."""
    import peft
    import torch
    import transformers

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), the figure the training targets compare."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent by the whole machine so far (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """How much of the machine other processes used while we measured.

    The cores are shared with other work; this turns that into a number printed next to
    the timings instead of a guess.
    """

    def __init__(self, who: int = resource.RUSAGE_CHILDREN):
        self.who = who
        self.started = time.perf_counter()
        self.busy = _busy_cpu_seconds()
        self.ours = self._ours()

    def _ours(self) -> float:
        usage = resource.getrusage(self.who)
        return usage.ru_utime + usage.ru_stime

    def others(self) -> float | None:
        """Fraction of all cores' time used by other processes since construction."""
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.started
        cores = os.cpu_count() or 1
        other = (busy - self.busy) - (self._ours() - self.ours)
        return round(max(0.0, other) / max(wall * cores, 1e-9), 3)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


T = TypeVar("T")


def run_together(jobs: Sequence[Callable[[], T | None]]) -> tuple[list[T], float]:
    """Run the jobs on their own threads, released at once; (results that are not None,
    wall seconds from the release to the last one's end)."""
    results: list[T | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs) + 1)

    def one(index: int) -> None:
        barrier.wait()
        results[index] = jobs[index]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return [r for r in results if r is not None], seconds


# -- children: one process per training run, so peak RSS is per run ------------------------------


def child_spec(
    args: argparse.Namespace, work: Path, base_dir: Path, **extra: Any
) -> dict[str, Any]:
    """A training child's spec: the base, the data and its size from ``args``, the feature
    cache under ``work``, then ``extra``."""
    return {
        "threads": args.threads,
        "base_dir": str(base_dir),
        "gsm8k": args.gsm8k,
        "n_train": args.train_problems,
        "n_held_out": args.held_out_problems,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "cache_dir": str(work / "features"),
        **extra,
    }


def run_child(module: str, spec: dict[str, Any], *, work_dir: Path) -> dict[str, Any]:
    """Run ``python -m module spec.json result.json`` and return its result.

    A fresh process per run makes its VmHWM that run's own peak, with no leftovers of the
    runs before it. ``cpu_share_others`` says how busy the machine was with other work.
    """
    handle, name = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=work_dir)
    os.close(handle)
    spec_file, result_file = Path(name), Path(name).with_suffix(".result.json")
    spec_file.write_text(json.dumps(spec), "utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    share = CpuShare()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", module, str(spec_file), str(result_file)],
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {spec.get('kind')} failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(result_file.read_text("utf-8"))
    result["process_seconds"] = time.perf_counter() - started
    result["cpu_share_others"] = share.others()
    return result


def child_main(run: Any) -> int:
    """Entry point of a child: read the spec, run, write the result with the peak RSS."""
    spec = json.loads(Path(sys.argv[1]).read_text("utf-8"))
    set_up_torch(int(spec["threads"]))
    result = run(spec)
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(sys.argv[2]).write_text(json.dumps(result), "utf-8")
    return 0


# -- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problems:
    """Training and held-out problems as raw JSONL bytes (what a user would upload)."""

    train: bytes
    held_out: bytes
    source: str


def _jsonl(rows: Sequence[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def load_problems(path: str | Path | None, n_train: int, n_held_out: int) -> Problems:
    """The first ``n_train`` GSM8K problems and the ``n_held_out`` after them.

    Falls back to the generated demo set when the GSM8K file is absent: the project never
    ships GSM8K, so a fresh clone without ``shared/`` still runs every benchmark.
    """
    file = Path(path) if path is not None else DEFAULT_GSM8K
    if file.is_file():
        lines = [line for line in file.read_bytes().splitlines() if line.strip()]
        if len(lines) < n_train + n_held_out:
            raise ValueError(f"{file} has {len(lines)} problems; {n_train + n_held_out} needed")
        train = b"\n".join(lines[:n_train]) + b"\n"
        held_out = b"\n".join(lines[n_train : n_train + n_held_out]) + b"\n"
        return Problems(train, held_out, f"GSM8K train split ({file.name})")
    from customization.demo_data import generate_demo_problems

    return Problems(
        _jsonl(generate_demo_problems(n_train, seed=0)),
        _jsonl(generate_demo_problems(n_held_out, seed=HELD_OUT_SEED)),
        "generated demo problems (GSM8K file absent)",
    )


def resolve_base(path: str | None) -> Path:
    """The base folder: ``--base`` when given, else the bundled SmolLM2 (prepared once)."""
    if path:
        return Path(path)
    from customization.base_model import prepare_bundled_base

    return prepare_bundled_base(DEFAULT_MODELS_DIR)


def load_lm_head(base_dir: Path) -> tuple[Any, int]:
    """Only the base's LM head weight (V, D) and its layer count, read from safetensors.

    A carry-on training node needs the frozen head and the cached features, not the base
    (docs/architecture.md, "What a training node holds"); this is the core's own reader
    (``customization.tail.load_tail_parts``).
    """
    from customization.tail import load_tail_parts

    parts = load_tail_parts(base_dir, 1, head_only=True)
    return parts.head_weight.float(), int(parts.hf_config.num_hidden_layers)


# -- result files -------------------------------------------------------------------------------


def _write_text(target: Path, text: str) -> None:
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_text(text, "utf-8")
    replace_durably(staging, target)


def write_json(target: Path, value: Any) -> None:
    """``value`` as indented JSON at ``target``, written atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_text(target, json.dumps(value, indent=2) + "\n")


def write_results(out_dir: Path, name: str, result: dict[str, Any], markdown: str) -> list[Path]:
    """``<name>.json`` and ``<name>.md`` in ``out_dir``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", result)
    _write_text(out_dir / f"{name}.md", markdown)
    return [out_dir / f"{name}.json", out_dir / f"{name}.md"]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def target_line(
    name: str, value: float | None, limit: float, *, at_most: bool, unit: str = "×"
) -> dict[str, Any]:
    """One target: its figure, its bound and whether the figure meets it."""
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {
        "target": name,
        "value": value,
        "limit": limit,
        "at_most": at_most,
        "met": met,
        "unit": unit,
    }


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        bound = f"{'≤' if t['at_most'] else '≥'} {t['limit']:g}{t['unit']}"
        verdict = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        rows.append([t["target"], f"{fmt(t['value'], 3)}{t['unit']}", bound, verdict])
    return md_table(["target", "measured", "bound", "verdict"], rows)


def machine_markdown(machine: dict[str, Any]) -> str:
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch "
        f"threads), {machine['memory_gib']} GiB; Python {machine['python']}, torch "
        f"{machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}; "
        f"{machine['date']}, commit {machine['git_commit']}"
        f"{' (with uncommitted changes)' if machine['git_dirty'] else ''}.\n"
    )


def bench_parser(prog: str, doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: size, base, data, output and threads."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--base", help="base model folder (default: the bundled SmolLM2)")
    parser.add_argument("--gsm8k", help="GSM8K train.jsonl (default: ../shared/data/gsm8k/)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def parse_sized(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    full: dict[str, Any],
    quick: dict[str, Any],
) -> argparse.Namespace:
    """Parse ``argv``; every size option left unset takes the full or the quick default."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
