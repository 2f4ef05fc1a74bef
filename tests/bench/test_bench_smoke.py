"""The benchmark harness at toy size: every path runs and writes its results.

Correctness of the harness only; nothing here asserts anything about speed.
"""

from __future__ import annotations

import json


def test_train_bench_writes_every_run(tiny_base_dir, toy_problems, tmp_path, restore_threads):
    """The training benchmark runs extraction, both carry-ons, the cache hit and a LoRA."""
    from bench import train_bench

    argv = [
        "--quick",
        "--base",
        str(tiny_base_dir),
        "--gsm8k",
        str(toy_problems),
        "--out",
        str(tmp_path),
        "--train-problems",
        "16",
        "--held-out-problems",
        "4",
        "--max-length",
        "64",
        "--epochs",
        "2",
        "--exact-match-problems",
        "2",
        "--max-new-tokens",
        "4",
        "--lora",
        "lora-qv",  # lora-all is the same path with more target modules
    ]
    assert train_bench.main(argv) == 0
    result = json.loads((tmp_path / "train.json").read_text("utf-8"))
    assert set(result["runs"]) == {"carry-on", "carry-on-4x256", "lora-qv"}
    for run in result["runs"].values():
        assert len(run["epochs"]) == 2
        assert run["peak_rss_bytes"] > 0
        assert run["artifact_bytes"] > 0
        assert all(e["valid_loss"] is not None for e in run["epochs"])
    assert result["cache_hit_job"]["cache_hit"] is True
    # issue 5's four lines, then the quality issue's five (LoRA all-linear's figures absent)
    assert len(result["targets"]) == 9
    assert [t["met"] for t in result["targets"][5:]] == [None] * 4
    assert set(result["exact_match"]) == {"base", "carry-on", "lora-qv"}
    for em in result["exact_match"].values():
        assert em["n"] == 2
        assert 0.0 <= em["exact_match"] <= 1.0
    assert set(result["curves"]) == set(result["runs"])
    assert "# Training benchmark" in (tmp_path / "train.md").read_text("utf-8")


def test_serve_bench_writes_every_comparison(
    tiny_base_dir, toy_problems, tmp_path, restore_threads
):
    """The serving benchmark times every decoding path, the concurrency, cold loads and
    the runs at scale: requests at once, churn, cold-load percentiles, a long prompt joining."""
    from bench import serve_bench

    argv = [
        "--quick",
        "--base",
        str(tiny_base_dir),
        "--gsm8k",
        str(toy_problems),
        "--out",
        str(tmp_path),
        "--new-tokens",
        "6",
        "--prompts",
        "2",
        "--adapters",
        "3",
        "--repeats",
        "1",
        "--cold-loads",
        "2",
        "--concurrency",
        "1,2",
        "--population",
        "12",
        "--population-loads",
        "5",
        "--churn-adapters",
        "10",
        "--churn-cache",
        "3",
        "--churn-requests",
        "6",
        "--long-prompt",
        "64",
        "--running",
        "2",
    ]
    assert serve_bench.main(argv) == 0
    result = json.loads((tmp_path / "serve.json").read_text("utf-8"))
    assert len(result["batch_1"]) == 6
    assert "engine, base + balanced tail" in result["batch_1"]
    for figures in result["batch_1"].values():
        # A random toy model may stop at once: the figures exist, whatever their size.
        assert figures["tokens_per_second"] >= 0
        assert figures["ttft_ms"] >= 0
    assert set(result["concurrency"]) == {
        "engine, carry-ons",
        "PEFT, LoRA q/v (adapter_names batch)",
    }
    assert len(result["cold_load_ms"]) == 2
    scale = result["scale"]
    assert set(scale["concurrency"]) == {"1", "2"}
    assert scale["concurrency"]["2"]["one_by_one_tokens_per_second"] is not None
    assert scale["churn"]["adapters"] == 10
    assert scale["churn"]["churn"]["cache_bytes_at_end"] <= scale["churn"]["cache_bound_bytes"]
    assert scale["churn"]["churn"]["rss_peak_bytes"] > 0
    for run in ("all_hot", "churn"):  # the peak less the KV caches: below the peak itself
        figures = scale["churn"][run]
        assert 0 < figures["rss_peak_beside_kv_cache_bytes"] <= figures["rss_peak_bytes"]
    assert scale["cold_loads"]["adapters_on_disk"] == 12
    assert scale["cold_loads"]["loads"] == 5
    assert 0 < scale["cold_loads"]["p50_ms"] <= scale["cold_loads"]["p99_ms"]
    assert scale["long_prompt"]["prompt_tokens"] > 0
    assert len(result["targets"]) == 11
    assert "# Serving benchmark" in (tmp_path / "serve.md").read_text("utf-8")

    # --join-only reruns just the long-prompt join, into files of its own.
    join_out = tmp_path / "join"
    join_argv = [str(join_out) if a == str(tmp_path) else a for a in argv]
    assert serve_bench.main([*join_argv, "--join-only"]) == 0
    joined = json.loads((join_out / "serve_join.json").read_text("utf-8"))
    assert joined["benchmark"] == "serve_join"
    assert joined["long_prompt"]["running"] == 2
    assert joined["long_prompt"]["prompt_tokens"] > 0
    assert "long-prompt join only" in (join_out / "serve_join.md").read_text("utf-8")

    # --cold-only reruns just the cold loads over the population, into files of its own.
    cold_out = tmp_path / "cold"
    cold_argv = [str(cold_out) if a == str(tmp_path) else a for a in argv]
    assert serve_bench.main([*cold_argv, "--cold-only"]) == 0
    cold = json.loads((cold_out / "serve_cold.json").read_text("utf-8"))
    assert cold["benchmark"] == "serve_cold"
    assert cold["cold_loads"]["adapters_on_disk"] == 12
    assert cold["cold_loads"]["loads"] == 5
    assert 0 < cold["cold_loads"]["p50_ms"] <= cold["cold_loads"]["p99_ms"]
    assert "cold loads only" in (cold_out / "serve_cold.md").read_text("utf-8")

    # --batch-1-only reruns just the batch-1 paths and their three targets.
    batch_out = tmp_path / "batch1"
    batch_argv = [str(batch_out) if a == str(tmp_path) else a for a in argv]
    assert serve_bench.main([*batch_argv, "--batch-1-only"]) == 0
    batch = json.loads((batch_out / "serve_batch1.json").read_text("utf-8"))
    assert batch["benchmark"] == "serve_batch1"
    assert set(batch["batch_1"]) == set(result["batch_1"])
    assert [t["target"] for t in batch["targets"]] == [t["target"] for t in result["targets"][:3]]
    assert "batch 1 only" in (batch_out / "serve_batch1.md").read_text("utf-8")
