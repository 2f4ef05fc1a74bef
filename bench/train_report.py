"""The training benchmark's Markdown report and its loss-against-time plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, machine_markdown, md_table, targets_table

RUN_LABELS = {
    "carry-on": "carry-on (default size)",
    "carry-on-4x256": "carry-on, 4 blocks d=256",
    "lora-qv": "LoRA r=8 q/v",
    "lora-all": "LoRA r=8 all linear",
}


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def _runs_table(result: dict[str, Any]) -> str:
    rows = []
    for name, run in result["runs"].items():
        losses = " / ".join(fmt(e["valid_loss"], 3) for e in run["epochs"])
        rows.append(
            [
                RUN_LABELS.get(name, name),
                f"{run['trainable_parameters']:,}",
                _mb(run["artifact_bytes"]),
                _mb(run["peak_rss_bytes"]),
                fmt(run["median_epoch_seconds"], 1),
                fmt(run["median_tokens_per_second"], 0),
                losses,
                fmt(result["ratios"].get(f"{name}_epoch_vs_lora_qv"), 3),
                fmt(run.get("cpu_share_others"), 2),
            ]
        )
    headers = [
        "run",
        "trainable params",
        "artifact",
        "peak RSS",
        "median epoch (s)",
        "tokens/s",
        "held-out loss per epoch",
        "epoch time vs LoRA q/v",
        "CPU used by others",
    ]
    return md_table(headers, rows)


def _curves_table(result: dict[str, Any]) -> str:
    rows = []
    for name, points in result["curves"].items():
        for index, (seconds, loss) in enumerate(points):
            rows.append([RUN_LABELS.get(name, name), index, fmt(seconds, 1), fmt(loss, 4)])
    return md_table(["run", "epoch", "wall-clock (s)", "held-out loss"], rows)


def _jobs_table(result: dict[str, Any]) -> str:
    extraction, hit = result["extraction"], result["cache_hit_job"]
    ours = result["runs"]["carry-on"]
    lora = result["runs"].get("lora-qv")
    rows = [
        ["extraction (validate, tokenize, base forward, cache)", fmt(extraction["job_seconds"], 1)],
        ["first carry-on job (extraction + training + save)", fmt(ours["first_job_seconds"], 1)],
        ["second job, feature cache hit (validate → save)", fmt(hit["job_seconds"], 1)],
        ["LoRA q/v, all epochs", fmt(lora["training_seconds"] if lora else None, 1)],
    ]
    return md_table(["job", "wall-clock (s)"], rows)


def _exact_match_table(result: dict[str, Any]) -> str:
    rows = [
        [name, f"{em['exact_match']:.3f}", f"{em['hits']} / {em['n']}", fmt(em["seconds"], 0)]
        for name, em in result.get("exact_match", {}).items()
    ]
    if not rows:
        return ""
    tokens = result["settings"].get("max_new_tokens")
    return (
        "\n## Final-answer exact match\n\n"
        f"Greedy decoding of at most {tokens} new tokens on the first held-out problems; the "
        "number after the last '####' (or the last number) must equal the reference's.\n\n"
        + md_table(["model", "exact match", "problems right", "seconds"], rows)
    )


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    extraction = result["extraction"]
    shares = [r["cpu_share_others"] for r in result["runs"].values() if r.get("cpu_share_others")]
    shared = (
        f"\nThe cores were shared: other processes used up to {max(shares):.0%} of the "
        'machine\'s CPU time during a run (column "CPU used by others").\n'
        if shares
        else ""
    )
    parts = [
        "# Training benchmark: carry-on vs PEFT LoRA\n",
        machine_markdown(result["machine"]),
        f"\nMode **{settings['mode']}**: base {settings['base']}, {settings['data_source']}, "
        f"{settings['train_problems']} training / {settings['held_out_problems']} held-out "
        f"problems ({extraction['n_tokens']:,} training tokens, "
        f"{extraction['n_target_tokens']:,} of them assistant targets), max "
        f"{settings['max_length']} tokens, {settings['epochs']} epoch(s), batch "
        f"{settings['batch_size']}, AdamW + warmup/cosine; learning rate "
        f"{settings['carry_on_learning_rate']:g} (carry-on default) and "
        f"{settings['lora_learning_rate'] or 0:g} (LoRA). Each run ran once, in its own "
        "process; per-epoch figures are medians over its epochs. The issue's full size: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings["full_spec"].items())
        + ".\n",
        *(f"\n{note}\n" for note in settings.get("notes", [])),
        shared,
        "\n## Targets\n\n",
        targets_table(result["targets"]),
        "\n## Runs\n\n",
        _runs_table(result),
        "\nTokens/s counts every token of the training examples (prompt and answer) per "
        "second of epoch; held-out loss is the mean over assistant tokens, as in training. "
        f"Base alone, held-out loss: {fmt(result['base_held_out_loss'], 4)}. "
        "Peak RSS is each run's own process: the carry-on's is a training node's (the LM head "
        "and the cached features, no base); the extraction process that held the base peaked "
        f"at {_mb(extraction['peak_rss_bytes'])}.\n",
        "\n## Jobs\n\n",
        _jobs_table(result),
        "\n## Held-out loss against wall-clock time\n\n",
        "Time since the job began, evaluation excluded; the carry-on's clock includes its "
        "feature extraction. Epoch 0 is the base alone.\n\n",
    ]
    if result.get("plot"):
        parts.append(f"![held-out loss against time]({result['plot']})\n\n")
    parts.append(_curves_table(result))
    parts.append(_exact_match_table(result))
    return "".join(parts)


def plot_curves(result: dict[str, Any], path: Path) -> Path | None:
    """Held-out loss against wall-clock seconds, one line per run; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in result["curves"].items():
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=RUN_LABELS.get(name, name))
    axes.set_xlabel("wall-clock seconds since the job began (carry-on: extraction included)")
    axes.set_ylabel("held-out assistant-token loss")
    axes.set_xscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
