"""Serving benchmark: our engine vs transformers and PEFT on the same base, and at scale.

    .venv/bin/python -m bench.serve_bench            # the full run
    .venv/bin/python -m bench.serve_bench --quick    # a smoke-sized run

Greedy decoding at batch 1 (tokens/s, time to first token) for the base through
``transformers.generate`` and through our engine, base + carry-on and base + a `balanced`
preset tail through our engine, and base + PEFT LoRA (unmerged); mixed-adapter
concurrency against PEFT and cold adapter loads.
Then serving at scale (bench/serve_scale.py): 1, 8 and 32 requests at once on as many
adapters (carry-ons and tails) against the base alone and one by one; adapter churn over
1,000 adapters with a cache of 64 against all hot, with the process's memory; cold-load
percentiles over 10,000 adapters on disk; a 2,000-token prompt joining a running batch of
8. Writes ``serve.json`` and ``serve.md`` into ``--out``. Every figure is a median over
repeats, and the ratios the targets name come from one run.

Whatever computes outside the engine (building the adapters and the peers, the peers'
generate calls, loads) runs on a thread of its own that ends with it
(``customization.runtime.on_own_thread``), and the engine's decode thread ends when it is
idle, so each path runs with the only OpenMP pool in the process, as a serving process has.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import serve_scale
from bench.common import (
    CpuShare,
    bench_parser,
    load_problems,
    machine_info,
    median,
    parse_sized,
    ratio,
    resolve_base,
    target_line,
    write_results,
)
from bench.serve_paths import Bench, Timing
from customization.base_model import load_base_model
from customization.runtime import on_own_thread, set_up_torch
from customization.serving import AdapterRef

FULL = {
    "new_tokens": 128,
    "prompts": 3,
    "adapters": 8,
    "repeats": 3,
    "cold_loads": 20,
    "concurrency": (1, 8, 32),
    "population": 10_000,
    "population_loads": 2_000,
    "churn_adapters": 1_000,
    "churn_cache": 64,
    "churn_requests": 256,
    "long_prompt": 2_000,
    "running": 8,
}
QUICK = {
    "new_tokens": 32,
    "prompts": 2,
    "adapters": 4,
    "repeats": 3,
    "cold_loads": 10,
    "concurrency": (1, 8, 32),
    "population": 1_000,
    "population_loads": 200,
    "churn_adapters": 1_000,
    "churn_cache": 64,
    "churn_requests": 32,
    "long_prompt": 512,
    "running": 8,
}


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
        "engine, base + balanced tail": bench.engine_balanced,
        "PEFT generate, LoRA q/v unmerged": bench.peft_qv,
        "PEFT generate, LoRA all-linear unmerged": bench.peft_all,
    }
    _log("batch 1: " + ", ".join(paths) + " ...")
    for path in paths.values():
        on_own_thread(path, bench.prompts[0], 4)  # warm-up: first-call allocations
    repeats: dict[str, list[list[Timing]]] = {name: [] for name in paths}
    # Round robin: every repeat runs every path, so a change in the machine's background
    # load hits all paths alike and the ratios stay side by side.
    for _ in range(args.repeats):
        for name, path in paths.items():
            repeats[name].append([on_own_thread(path, p, args.new_tokens) for p in bench.prompts])
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
        on_own_thread(together, 4)  # warm-up
        concurrent, sequential = [], []
        for _ in range(args.repeats):  # alternated, for the same reason as above
            concurrent.append(on_own_thread(together, args.new_tokens))
            sequential.append(on_own_thread(one_by_one, args.new_tokens))
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
            [on_own_thread(bench.cold_load_carry_on) for _ in range(args.cold_loads)]
        )
        * 1000,
        "PEFT LoRA q/v (load_adapter)": median(
            [on_own_thread(bench.cold_load_lora, i) for i in range(args.cold_loads)]
        )
        * 1000,
    }


def _mixed(bench: Bench, args: argparse.Namespace, work: Path) -> list[AdapterRef]:
    return on_own_thread(
        lambda: serve_scale.write_mixed_adapters(bench.base, max(args.concurrency), work / "mixed")
    )


def _join(bench: Bench, args: argparse.Namespace, mixed: list[AdapterRef]) -> dict[str, Any]:
    """A long prompt joining running requests, ``repeats`` times: sizes as they are,
    timings as medians."""
    _log(f"a {args.long_prompt}-token prompt joining {args.running} running requests ...")
    joins = [
        serve_scale.long_prompt_join(
            bench.base,
            bench.mixed_prompts,
            mixed,
            prompt_tokens=args.long_prompt,
            running=args.running,
            new_tokens=args.new_tokens,
        )
        for _ in range(args.repeats)
    ]
    return {
        key: value if isinstance(value, int) else _median_or_none([j[key] for j in joins])
        for key, value in joins[0].items()
    }


def _scale(bench: Bench, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The runs at scale (bench/serve_scale.py), on the batch-1 runs' base and prompts."""
    base, prompts = bench.base, bench.mixed_prompts
    _log(f"writing {max(args.concurrency)} mixed adapters and {args.population} small ones ...")
    mixed = _mixed(bench, args, work)
    population = on_own_thread(
        lambda: serve_scale.write_population(
            base, max(args.population, args.churn_adapters), work / "population"
        )
    )
    _log(f"{', '.join(map(str, args.concurrency))} requests at once on as many adapters ...")
    concurrency = serve_scale.concurrency(
        base, prompts, mixed, args.concurrency, args.new_tokens, args.repeats
    )
    _log(f"churn over {args.churn_adapters} adapters, cache of {args.churn_cache} ...")
    churn = serve_scale.churn(
        base,
        prompts,
        population,
        adapters=args.churn_adapters,
        cache_entries=args.churn_cache,
        requests=args.churn_requests,
        clients=args.running,
        new_tokens=args.new_tokens,
    )
    _log(f"cold loads over {len(population.refs)} adapters on disk ...")
    cold = serve_scale.cold_loads(base, population, args.population_loads)
    join = _join(bench, args, mixed)
    return {"concurrency": concurrency, "churn": churn, "cold_loads": cold, "long_prompt": join}


def _median_or_none(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def _batch_one_targets(batch: dict[str, Any]) -> list[Any]:
    """The batch-1 lines of issues 13 and 14."""
    engine_base = batch["engine, base"]["tokens_per_second"]
    return [
        target_line(
            "default adapter (carry-on) / base, batch 1",
            ratio(batch["engine, base + carry-on"]["tokens_per_second"], engine_base),
            0.97,
            at_most=False,
        ),
        target_line(
            "`balanced` tail / base, batch 1 (issue 13)",
            ratio(batch["engine, base + balanced tail"]["tokens_per_second"], engine_base),
            0.95,
            at_most=False,
        ),
        target_line(
            "our base decoding / transformers generate",
            ratio(engine_base, batch["transformers generate, base"]["tokens_per_second"]),
            1.0,
            at_most=False,
        ),
    ]


def _targets(batch: dict[str, Any], scale: dict[str, Any]) -> Any:
    """Issue 14's acceptance figures, each from this one run."""
    eight = scale["concurrency"].get("8", {})
    cold, churn = scale["cold_loads"], scale["churn"]
    mib = 1024 * 1024
    return [
        *_batch_one_targets(batch),
        target_line(
            "8 requests on 8 adapters / one by one",
            eight.get("adapters_vs_one_by_one"),
            3,
            at_most=False,
        ),
        target_line(
            "8 requests on 8 adapters / a base-only batch of 8",
            eight.get("adapters_vs_base"),
            0.85,
            at_most=False,
        ),
        target_line(
            f"cold load p50, {cold['adapters_on_disk']} adapters on disk",
            cold["p50_ms"],
            10,
            at_most=True,
            unit=" ms",
        ),
        target_line(
            f"cold load p99, {cold['adapters_on_disk']} adapters on disk",
            cold["p99_ms"],
            30,
            at_most=True,
            unit=" ms",
        ),
        target_line(
            f"churn over {churn['adapters']} adapters, cache {churn['cache_entries']} / all hot",
            churn["churn_vs_all_hot"],
            0.7,
            at_most=False,
        ),
        *(
            target_line(
                f"process memory {when} under churn over the same requests served hot (MiB) "
                "/ the cache bound",
                churn[key] / mib,
                round(churn["cache_bound_bytes"] / mib, 2),
                at_most=True,
                unit=" MiB",
            )
            for when, key in (
                ("at its peak", "churn_peak_over_all_hot_bytes"),
                ("once idle again", "churn_rss_over_all_hot_bytes"),
            )
        ),
        target_line(
            f"others' token gap while a {scale['long_prompt']['prompt_tokens']}-token prompt "
            "joins / a normal step",
            scale["long_prompt"]["join_gap_vs_normal_step"],
            2,
            at_most=True,
        ),
    ]


def _bench(args: argparse.Namespace, work: Path, problems: Any) -> Bench:
    """The loaded base, adapters and peers every section runs (``balanced``'s tail too)."""
    bench = on_own_thread(lambda: Bench.build(resolve_base(args.base), problems, args, work))
    bench.balanced_ref = on_own_thread(
        lambda: serve_scale.write_mixed_adapters(bench.base, 2, work / "balanced")[1]
    )
    return bench


def run_batch_one(args: argparse.Namespace) -> dict[str, Any]:
    """Only the batch-1 paths, as the full run measures them (to re-check a change)."""
    set_up_torch(args.threads)
    problems = load_problems(args.gsm8k, 0, max(args.prompts, args.adapters))
    machine = machine_info(args.threads)
    share = CpuShare(who=0)
    with tempfile.TemporaryDirectory(prefix="serve-batch1-") as work:
        bench = _bench(args, Path(work), problems)
        try:
            batch = _batch_one(bench, args)
        finally:
            bench.close()
    return {
        "benchmark": "serve_batch1",
        "machine": machine,
        "settings": {
            "data_source": problems.source,
            **{key: getattr(args, key) for key in FULL},
            "prompt_tokens": [len(p) for p in bench.prompts],
        },
        "cpu_share_others": share.others(),
        "batch_1": batch,
        "targets": _batch_one_targets(batch),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_up_torch(args.threads)
    base_dir = resolve_base(args.base)
    problems = load_problems(args.gsm8k, 0, max(args.prompts, args.adapters))
    machine = machine_info(args.threads)
    share = CpuShare(who=0)  # RUSAGE_SELF: everything runs in this process
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as work:
        bench = _bench(args, Path(work), problems)
        try:
            batch = _batch_one(bench, args)
            concurrency = _concurrency(bench, args)
            cold = _cold_loads(bench, args)
            scale = _scale(bench, args, Path(work))
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
        "scale": scale,
        "targets": _targets(batch, scale),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.serve_bench", __doc__, "fewer, shorter requests")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--adapters", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--cold-loads", type=int)
    parser.add_argument(
        "--concurrency", type=_counts, help="requests at once, comma-separated (1,8,32)"
    )
    parser.add_argument("--population", type=int, help="adapters on disk for the cold loads")
    parser.add_argument("--population-loads", type=int, help="cold loads timed among them")
    parser.add_argument("--churn-adapters", type=int)
    parser.add_argument("--churn-cache", type=int, help="the cache bound, in adapters")
    parser.add_argument("--churn-requests", type=int)
    parser.add_argument("--long-prompt", type=int, help="tokens of the prompt that joins")
    parser.add_argument("--running", type=int, help="requests running when it joins")
    parser.add_argument(
        "--batch-1-only",
        action="store_true",
        help="only the batch-1 paths and their targets (writes serve_batch1.json/.md)",
    )
    parser.add_argument(
        "--join-only",
        action="store_true",
        help="only the long prompt joining running requests (writes serve_join.json/.md)",
    )
    parser.add_argument(
        "--cold-only",
        action="store_true",
        help="only the cold loads among the population on disk (writes serve_cold.json/.md)",
    )
    return parse_sized(parser, argv, full=FULL, quick=QUICK)


def _counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(",") if part.strip())
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts like 1,8,32, got {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    from bench.serve_report import batch_one_markdown, markdown

    args = parse_args(argv)
    if args.batch_1_only:
        batch = run_batch_one(args)
        for path in write_results(args.out, "serve_batch1", batch, batch_one_markdown(batch)):
            _log(f"wrote {path}")
        return 0
    if args.join_only:
        joined = run_join(args)
        for path in write_results(args.out, "serve_join", joined, join_markdown(joined)):
            _log(f"wrote {path}")
        return 0
    if args.cold_only:
        cold = run_cold(args)
        for path in write_results(args.out, "serve_cold", cold, cold_markdown(cold)):
            _log(f"wrote {path}")
        return 0
    result = run(args)
    for path in write_results(args.out, "serve", result, markdown(result)):
        _log(f"wrote {path}")
    return 0


def _part_alone(
    args: argparse.Namespace, name: str, key: str, measure: Callable[[Path], Any]
) -> dict[str, Any]:
    """One part of the full run alone (to re-check a change): its figures under ``key``,
    with the machine, settings and the others' CPU share as the full run records them."""
    set_up_torch(args.threads)
    machine = machine_info(args.threads)
    share = CpuShare(who=0)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as work:
        figures = measure(Path(work))
    return {
        "benchmark": name,
        "machine": machine,
        "settings": {option: getattr(args, option) for option in FULL},
        "cpu_share_others": share.others(),
        key: figures,
    }


def run_join(args: argparse.Namespace) -> dict[str, Any]:
    """Only the long-prompt join, as the full run measures it."""
    problems = load_problems(args.gsm8k, 0, max(args.prompts, args.adapters))

    def measure(work: Path) -> dict[str, Any]:
        base_dir = resolve_base(args.base)
        bench = on_own_thread(lambda: Bench.build(base_dir, problems, args, work))
        try:
            return _join(bench, args, _mixed(bench, args, work))
        finally:
            bench.close()

    return _part_alone(args, "serve_join", "long_prompt", measure)


def run_cold(args: argparse.Namespace) -> dict[str, Any]:
    """Only the cold loads over the population on disk, as the full run measures them."""

    def measure(work: Path) -> dict[str, Any]:
        base = on_own_thread(lambda: load_base_model(resolve_base(args.base)))
        population = on_own_thread(
            lambda: serve_scale.write_population(base, args.population, work)
        )
        _log(f"cold loads over {len(population.refs)} adapters on disk ...")
        return on_own_thread(
            lambda: serve_scale.cold_loads(base, population, args.population_loads)
        )

    return _part_alone(args, "serve_cold", "cold_loads", measure)


def cold_markdown(result: dict[str, Any]) -> str:
    cold, machine = result["cold_loads"], result["machine"]
    return (
        f"# Serving benchmark, the cold loads only\n\n"
        f"`python -m bench.serve_bench --cold-only`; {machine['date']}, commit "
        f"{machine['git_commit']}; other processes used "
        f"{100 * result['cpu_share_others']:.0f}% of the CPU.\n\n"
        f"{cold['loads']} misses among {cold['adapters_on_disk']} adapters on disk "
        f"({cold['artifact_bytes'] / 1024:.0f} KiB each, in the OS page cache): p50 "
        f"**{cold['p50_ms']:.2f} ms** (bound ≤ 10), p90 {cold['p90_ms']:.2f}, p99 "
        f"**{cold['p99_ms']:.2f} ms** (bound ≤ 30), max {cold['max_ms']:.2f}.\n"
    )


def join_markdown(result: dict[str, Any]) -> str:
    join, machine = result["long_prompt"], result["machine"]

    def figure(key: str, spec: str) -> str:
        value = join.get(key)
        return "n/a" if value is None else format(value, spec)

    return (
        f"# Serving benchmark, the long-prompt join only\n\n"
        f"`python -m bench.serve_bench --join-only`; {machine['date']}, commit "
        f"{machine['git_commit']}; other processes used "
        f"{100 * result['cpu_share_others']:.0f}% of the CPU.\n\n"
        f"A {join['prompt_tokens']}-token prompt joining {join['running']} running requests "
        f"(medians of {result['settings']['repeats']}): its time to first token "
        f"{figure('ttft_ms', ',.0f')} ms; the others' normal step "
        f"{figure('normal_step_ms', '.1f')} ms, their longest gap while it joins "
        f"{figure('join_gap_ms', '.1f')} ms (**{figure('join_gap_vs_normal_step', '.2f')}×**, "
        f"bound ≤ 2×), their median gap {figure('join_gap_median_ms', '.1f')} ms.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
