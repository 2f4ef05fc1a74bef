"""The serving benchmark's Markdown report."""

from __future__ import annotations

from typing import Any

from bench.common import fmt, machine_markdown, md_table, ratio, targets_table


def _batch_table(result: dict[str, Any]) -> str:
    batch = result["batch_1"]
    reference = batch["engine, base"]["tokens_per_second"]
    rows = [
        [
            name,
            fmt(figures["tokens_per_second"], 1),
            fmt(figures["ttft_ms"], 1),
            fmt(ratio(figures["tokens_per_second"], reference), 3),
        ]
        for name, figures in batch.items()
    ]
    return md_table(["path", "tokens/s", "time to first token (ms)", "vs engine, base"], rows)


def _concurrency_table(result: dict[str, Any]) -> str:
    rows = [
        [
            name,
            fmt(figures["concurrent_tokens_per_second"], 1),
            fmt(figures["sequential_tokens_per_second"], 1),
            f"{fmt(figures['speedup'], 2)}×",
        ]
        for name, figures in result["concurrency"].items()
    ]
    headers = ["path", "together (tokens/s)", "one after another (tokens/s)", "speed-up"]
    return md_table(headers, rows)


def _times(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{fmt(value, digits)}×"


def _scale_concurrency_table(scale: dict[str, Any]) -> str:
    rows = [
        [
            count,
            fmt(figures["adapters_tokens_per_second"], 1),
            fmt(figures["base_tokens_per_second"], 1),
            fmt(figures["one_by_one_tokens_per_second"], 1),
            _times(figures["adapters_vs_base"], 3),
            _times(figures["adapters_vs_one_by_one"], 2),
        ]
        for count, figures in scale["concurrency"].items()
    ]
    headers = [
        "requests at once",
        "on as many adapters (tokens/s)",
        "base only (tokens/s)",
        "adapters one by one (tokens/s)",
        "adapters / base only",
        "together / one by one",
    ]
    return md_table(headers, rows)


def _mib(value: float | None) -> float | None:
    return None if value is None else value / (1024 * 1024)


def _churn_table(churn: dict[str, Any]) -> str:
    mib = 1024 * 1024
    rows = [
        [
            name,
            fmt(run["tokens_per_second"], 1),
            run["adapter_loads"],
            run["adapter_hits"],
            fmt(run["cache_bytes_at_end"] / mib, 2),
            fmt(run["rss_peak_bytes"] / mib if "rss_peak_bytes" in run else None, 1),
            fmt(_mib(run.get("rss_peak_beside_kv_cache_bytes")), 1),
            fmt(run["rss_growth_bytes"] / mib, 1),
        ]
        for name, run in (("all hot", churn["all_hot"]), ("churn", churn["churn"]))
    ]
    headers = [
        "run",
        "tokens/s",
        "adapter loads",
        "cache hits",
        "cache at the end (MiB)",
        "process peak RSS (MiB)",
        "peak RSS beside the KV caches (MiB)",
        "process RSS growth, idle again (MiB)",
    ]
    return md_table(headers, rows)


def _scale_markdown(scale: dict[str, Any]) -> str:
    churn, cold, join = scale["churn"], scale["cold_loads"], scale["long_prompt"]
    percentiles = md_table(
        ["p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)"],
        [[fmt(cold[key], 2) for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]],
    )
    return "".join(
        [
            "\n## At scale: requests at once on as many adapters\n\n",
            "Adapters alternate between the default carry-on and a `balanced` tail, all "
            "cached before the run; the base-only batch of the same size is the ceiling.\n\n",
            _scale_concurrency_table(scale),
            f"\n## Adapter churn: {churn['requests']} requests over {churn['adapters']} "
            f"adapters, a cache of {churn['cache_entries']}\n\n",
            f"{churn['clients']} clients at once; the cache bound is "
            f"{fmt(churn['cache_bound_bytes'] / (1024 * 1024), 2)} MiB ({churn['cache_entries']} "
            "loaded adapters); all hot: the same requests over as many adapters as the cache "
            f"holds, loaded before. Churn / all hot: {_times(churn['churn_vs_all_hot'], 3)}. "
            "The all-hot run goes first and brings the allocator to the batch's working set; "
            "what the process holds under churn beyond that, at its peak while serving: "
            f"{fmt(churn.get('churn_peak_over_all_hot_bytes', 0) / (1024 * 1024), 1)} MiB; "
            "at its peak beside the KV caches (the resident set less what the engine's KV "
            "caches held at that moment, which follows the requests' lengths and how their "
            "joins fall, not the adapters): "
            f"{fmt(_mib(churn.get('churn_peak_beside_kv_over_all_hot_bytes')), 1)} MiB; "
            "once the engine is idle again: "
            f"{fmt(churn.get('churn_rss_over_all_hot_bytes', 0) / (1024 * 1024), 1)} MiB.\n\n",
            _churn_table(churn),
            f"\n## Cold loads: {cold['loads']} misses among {cold['adapters_on_disk']} "
            "adapters on disk\n\n",
            f"Each adapter is a {fmt(cold['artifact_bytes'] / 1024, 0)} KiB carry-on folder "
            f"(written and flushed to disk in {fmt(cold['write_seconds'], 1)} s, so in the OS "
            "page cache); a miss reads, hashes and checks it as the serving cache does.\n\n",
            percentiles,
            f"\n## A {join['prompt_tokens']}-token prompt joining {join['running']} running "
            "requests\n\n",
            md_table(
                [
                    "its time to first token (ms)",
                    "others' normal step (ms)",
                    "others' longest gap while it joins (ms)",
                    "ratio",
                    "others' median gap while it joins (ms)",
                ],
                [
                    [
                        fmt(join["ttft_ms"], 1),
                        fmt(join["normal_step_ms"], 1),
                        fmt(join["join_gap_ms"], 1),
                        _times(join["join_gap_vs_normal_step"], 2),
                        fmt(join.get("join_gap_median_ms"), 1),
                    ]
                ],
            ),
        ]
    )


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    cold = md_table(
        ["adapter", "cold load (ms, median)"],
        [[name, fmt(ms, 2)] for name, ms in result["cold_load_ms"].items()],
    )
    share = result.get("cpu_share_others")
    count = settings["adapters"]
    return "".join(
        [
            "# Serving benchmark: our engine vs transformers and PEFT\n",
            machine_markdown(result["machine"]),
            f"\nMode **{settings['mode']}**: base {settings['base']}, prompts from "
            f"{settings['data_source']} ({settings['prompt_tokens']} prompt tokens), greedy, "
            f"{settings['new_tokens']} new tokens at most, medians of {settings['repeats']} "
            f"repeats; {settings['adapters']} adapters for the concurrency test; cold loads: "
            f"median of {settings['cold_loads']}. The carry-on is the default size with "
            "trained-like (non-zero) weights; LoRA adapters have non-zero B. Tokens/s "
            "include the prefill (time to first token). Stop tokens end a reply early, so "
            "token counts can differ between paths.\n",
            f"\nOther processes used {fmt((share or 0) * 100, 0)}% of the machine's CPU time "
            "during the run (the cores are shared).\n",
            "\n## Targets\n\n",
            targets_table(result["targets"]),
            "\n## Batch 1\n\n",
            _batch_table(result),
            f"\n## {count} requests on {count} different adapters\n\n",
            _concurrency_table(result),
            "\n## Cold adapter load from disk\n\n",
            "The files are in the OS page cache (just written): this is the load and "
            "verification cost, not the disk's.\n\n",
            cold,
            _scale_markdown(result["scale"]),
        ]
    )


def batch_one_markdown(result: dict[str, Any]) -> str:
    """``--batch-1-only``: the batch-1 table and its targets."""
    settings = result["settings"]
    share = result.get("cpu_share_others")
    return "".join(
        [
            "# Serving benchmark, batch 1 only\n",
            machine_markdown(result["machine"]),
            f"\n`python -m bench.serve_bench --batch-1-only`: prompts from "
            f"{settings['data_source']} ({settings['prompt_tokens']} prompt tokens), greedy, "
            f"{settings['new_tokens']} new tokens at most, medians of {settings['repeats']} "
            "repeats, every path in each round. Other processes used "
            f"{'n/a' if share is None else format(100 * share, '.0f')}% of the CPU.\n",
            "\n## Targets\n\n",
            targets_table(result["targets"]),
            "\n## Batch 1\n\n",
            _batch_table(result),
        ]
    )
