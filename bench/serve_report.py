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
        ]
    )
