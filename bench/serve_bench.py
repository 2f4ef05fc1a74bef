"""Serving benchmark: our engine vs transformers and PEFT on the same base (issue 5.2).

    .venv/bin/python -m bench.serve_bench            # the full run
    .venv/bin/python -m bench.serve_bench --quick    # a smoke-sized run

Greedy decoding at batch 1 (tokens/s, time to first token) for the base through
``transformers.generate`` and through our engine, base + carry-on through our engine and
base + PEFT LoRA (unmerged); then mixed-adapter concurrency and cold adapter loads. Writes
``serve.json`` and ``serve.md`` into ``--out``. Every figure is a median over repeats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CpuShare,
    bench_parser,
    load_problems,
    machine_info,
    median,
    parse_sized,
    ratio,
    resolve_base,
    set_threads,
    target_line,
    write_results,
)
from bench.serve_paths import Bench, Timing

FULL = {"new_tokens": 128, "prompts": 3, "adapters": 8, "repeats": 3, "cold_loads": 20}
QUICK = {"new_tokens": 32, "prompts": 2, "adapters": 4, "repeats": 3, "cold_loads": 10}


def _log(message: str) -> None:
    print(f"[serve_bench] {message}", file=sys.stderr, flush=True)


def _summary(repeats: list[list[Timing]]) -> dict[str, Any]:
    """Median over repeats of tokens/s (each repeat: all prompts) and median TTFT."""
    rates = [sum(t.tokens for t in r) / sum(t.seconds for t in r) for r in repeats]
    ttfts = [t.ttft for r in repeats for t in r]
    return {
        "tokens_per_second": median(rates),
        "ttft_ms": median(ttfts) * 1000,
        "tokens_per_repeat": sum(t.tokens for t in repeats[0]),
        "repeat_tokens_per_second": rates,
    }


def _batch_one(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    paths = {
        "transformers generate, base": bench.hf_base,
        "engine, base": bench.engine_base,
        "engine, base + carry-on": bench.engine_carry_on,
        "PEFT generate, LoRA q/v unmerged": bench.peft_qv,
        "PEFT generate, LoRA all-linear unmerged": bench.peft_all,
    }
    _log("batch 1: " + ", ".join(paths) + " ...")
    for path in paths.values():
        path(bench.prompts[0], 4)  # warm-up: first-call allocations are not the steady state
    repeats: dict[str, list[list[Timing]]] = {name: [] for name in paths}
    # Round robin: every repeat runs every path, so a change in the machine's background
    # load hits all paths alike and the ratios stay side by side.
    for _ in range(args.repeats):
        for name, path in paths.items():
            repeats[name].append([path(p, args.new_tokens) for p in bench.prompts])
    return {name: _summary(runs) for name, runs in repeats.items()}


def _throughputs(runs: list[tuple[int, float]]) -> float:
    return median([tokens / seconds for tokens, seconds in runs])


def _concurrency(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name, together, one_by_one in (
        ("engine, carry-ons", bench.engine_concurrent, bench.engine_sequential),
        ("PEFT, LoRA q/v (adapter_names batch)", bench.peft_mixed, bench.peft_sequential),
    ):
        _log(f"{args.adapters} requests on {args.adapters} adapters: {name} ...")
        together(4)  # warm-up
        concurrent, sequential = [], []
        for _ in range(args.repeats):  # alternated, for the same reason as above
            concurrent.append(together(args.new_tokens))
            sequential.append(one_by_one(args.new_tokens))
        results[name] = {
            "concurrent_tokens_per_second": _throughputs(concurrent),
            "sequential_tokens_per_second": _throughputs(sequential),
            "speedup": ratio(_throughputs(concurrent), _throughputs(sequential)),
        }
    return results


def _cold_loads(bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    _log("cold adapter loads ...")
    return {
        "carry-on (load_carry_on: sha256 + fingerprint check)": median(
            [bench.cold_load_carry_on() for _ in range(args.cold_loads)]
        )
        * 1000,
        "PEFT LoRA q/v (load_adapter)": median(
            [bench.cold_load_lora(i) for i in range(args.cold_loads)]
        )
        * 1000,
    }


def _targets(batch: dict[str, Any], concurrency: dict[str, Any], cold: dict[str, float]) -> Any:
    decode = ratio(
        batch["engine, base + carry-on"]["tokens_per_second"],
        batch["engine, base"]["tokens_per_second"],
    )
    return [
        target_line("carry-on decoding / base decoding, same engine", decode, 0.9, at_most=False),
        target_line(
            "concurrent requests on different adapters / one by one",
            concurrency["engine, carry-ons"]["speedup"],
            2.5,
            at_most=False,
        ),
        target_line(
            "cold carry-on load",
            next(iter(cold.values())),
            20,
            at_most=True,
            unit=" ms",
        ),
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    base_dir = resolve_base(args.base)
    problems = load_problems(args.gsm8k, 0, max(args.prompts, args.adapters))
    machine = machine_info(args.threads)
    share = CpuShare(who=0)  # RUSAGE_SELF: everything runs in this process
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as work:
        bench = Bench.build(base_dir, problems, args, Path(work))
        try:
            batch = _batch_one(bench, args)
            concurrency = _concurrency(bench, args)
            cold = _cold_loads(bench, args)
        finally:
            bench.close()
    settings = {
        "mode": "quick" if args.quick else "full",
        "base": base_dir.name,
        "data_source": problems.source,
        **{key: getattr(args, key) for key in FULL},
        "prompt_tokens": [len(p) for p in bench.prompts],
        "carry_on_config": bench.carry_on_config,
    }
    return {
        "benchmark": "serve",
        "machine": machine,
        "settings": settings,
        "cpu_share_others": share.others(),
        "batch_1": batch,
        "concurrency": concurrency,
        "cold_load_ms": cold,
        "targets": _targets(batch, concurrency, cold),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.serve_bench", __doc__, "fewer, shorter requests")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--adapters", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--cold-loads", type=int)
    return parse_sized(parser, argv, full=FULL, quick=QUICK)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.serve_report import markdown

    args = parse_args(argv)
    result = run(args)
    for path in write_results(args.out, "serve", result, markdown(result)):
        _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
