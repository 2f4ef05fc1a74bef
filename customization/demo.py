"""The headless demo: a task the frozen base gets wrong, learned by a carry-on in minutes.

Prepare the bundled base, generate a task's training problems (``demo_tasks``), extract
hidden states once and train the default carry-on, then compare base and base + carry-on
on held-out problems from the same generator with another seed: assistant-token loss,
exact match by the task's own checker, and a few answers side by side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from customization.base_model import FrozenBase, load_base_model, prepare_bundled_base
from customization.carry_on import CarryOn
from customization.checkpoint import load_carry_on
from customization.config import CarryOnConfig, TrainingConfig
from customization.datasets import Example, load_dataset
from customization.demo_tasks import DEFAULT_TASK, HELD_OUT_SEED, DemoTask, get_task
from customization.evaluation import exact_match, features_in_memory, heldout_metrics
from customization.pipeline import progress_bar, train_pipeline
from customization.tokenizer import tokenize_examples

MAX_LENGTH = 384


@dataclass
class Side:
    """One model's held-out figures."""

    loss: float
    exact_match: float
    predictions: list[str]


@dataclass
class DemoResult:
    task: str
    n_train: int
    n_held_out: int
    base: Side
    adapter: Side
    job_seconds: float
    adapter_path: str
    prompts: list[str]
    references: list[str]


def run_demo(
    *,
    models_dir: Path,
    work_dir: Path,
    task: str = DEFAULT_TASK,
    n_problems: int | None = None,
    n_held_out: int = 50,
    epochs: int | None = None,
    device: str = "cpu",
    quiet: bool = False,
) -> int:
    """The demo as the CLI runs it: progress on stderr, the before/after table on stdout."""
    demo_task = get_task(task)
    started = time.perf_counter()
    print(f"1. preparing the bundled base in {models_dir} ...", flush=True)
    base = load_base_model(prepare_bundled_base(models_dir), device=device)
    print(f"   {base.name}: {base.num_layers} layers, width {base.hidden_size}")
    n_train = demo_task.n_train if n_problems is None else n_problems
    print(f"2. task {demo_task.name!r}: {demo_task.summary}")
    print(f"   {n_train} generated training problems, {n_held_out} held out (another seed)")
    print("3. extracting hidden states once, then training the default carry-on ...", flush=True)
    result = demo_run(
        base,
        demo_task,
        work_dir=work_dir,
        n_train=n_train,
        n_held_out=n_held_out,
        epochs=demo_task.epochs if epochs is None else epochs,
        quiet=quiet,
    )
    print(f"   job (extraction + training) {result.job_seconds:.0f} s")
    print("4. held-out evaluation")
    print(format_table(result))
    print("\n5. sample answers")
    print(format_samples(result, 3))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; adapter at {result.adapter_path}")
    return 0


def demo_run(
    base: FrozenBase,
    task: DemoTask,
    *,
    work_dir: Path,
    n_train: int,
    n_held_out: int,
    epochs: int,
    quiet: bool = True,
    carry_on_config: CarryOnConfig | None = None,
) -> DemoResult:
    """Train the task's carry-on on ``n_train`` problems and evaluate both sides held out."""
    training_config = TrainingConfig(epochs=epochs, learning_rate=task.learning_rate)
    summary = train_pipeline(
        base,
        task.jsonl(n_train, seed=0),
        carry_on_config=carry_on_config or CarryOnConfig(),
        training_config=training_config,
        max_length=MAX_LENGTH,
        storage_dtype="float16",
        cache_dir=work_dir / "features",
        out=work_dir / task.name,
        valid_fraction=0.05,
        quiet=quiet,
    )
    job_seconds = summary["extraction_seconds"] + summary["training_seconds"]
    carry_on = load_carry_on(summary["adapter"], base_fingerprints=[base.fingerprint()])
    train_prompts = {_prompt(e) for e in load_dataset(task.jsonl(n_train, seed=0))}
    # Held-out problems that happen to equal a training one would flatter the adapter:
    # skip them, drawing from a larger held-out pool (the same for any n_train).
    pool = load_dataset(task.jsonl(4 * n_held_out + 8, seed=HELD_OUT_SEED))
    held_out = [e for e in pool if _prompt(e) not in train_prompts][:n_held_out]
    return DemoResult(
        task=task.name,
        n_train=n_train,
        n_held_out=len(held_out),
        base=_evaluate(base, None, task, held_out, quiet=quiet),
        adapter=_evaluate(base, carry_on, task, held_out, quiet=quiet),
        job_seconds=job_seconds,
        adapter_path=summary["adapter"],
        prompts=[_prompt(e) for e in held_out],
        references=[e.messages[-1]["content"] for e in held_out],
    )


def _prompt(example: Example) -> str:
    return example.messages[0]["content"]


def _evaluate(
    base: FrozenBase,
    carry_on: CarryOn | None,
    task: DemoTask,
    examples: Sequence[Example],
    *,
    quiet: bool,
) -> Side:
    tokenized = tokenize_examples(examples, base.tokenizer, max_length=MAX_LENGTH)
    taps = carry_on.config.taps if carry_on is not None else (-1,)
    loss = heldout_metrics(base, carry_on, features_in_memory(base, tokenized, taps))["loss"]
    who = "base" if carry_on is None else "+ carry-on"
    bar = None if quiet else progress_bar(len(examples), f"answer ({who})", "ex")
    matched = exact_match(
        base,
        carry_on,
        examples,
        max_new_tokens=task.max_new_tokens,
        progress=None if bar is None else (lambda done, total: bar.update(done - bar.n)),
    )
    if bar is not None:
        bar.close()
    hits = sum(
        task.check(p, r) for p, r in zip(matched.predictions, matched.references, strict=True)
    )
    return Side(loss, hits / max(len(examples), 1), matched.predictions)


def format_table(result: DemoResult) -> str:
    n = result.n_held_out
    rows: list[tuple[str, Any, Any]] = [
        ("held-out loss", f"{result.base.loss:.3f}", f"{result.adapter.loss:.3f}"),
        (
            f"exact match ({n})",
            _percent(result.base.exact_match, n),
            _percent(result.adapter.exact_match, n),
        ),
    ]
    lines = [f"   {'':22}{'base':>14}{'+ carry-on':>16}"]
    lines += [f"   {label:22}{before:>14}{after:>16}" for label, before, after in rows]
    return "\n".join(lines)


def _percent(rate: float, n: int) -> str:
    return f"{round(rate * n)}/{n} {rate:.0%}"


def format_samples(result: DemoResult, n: int) -> str:
    blocks = []
    for i in range(min(n, result.n_held_out)):
        blocks.append(
            "\n".join(
                [
                    f"   Q:          {result.prompts[i]}",
                    f"   expected:   {result.references[i]}",
                    f"   base:       {_one_line(result.base.predictions[i])}",
                    f"   + carry-on: {_one_line(result.adapter.predictions[i])}",
                ]
            )
        )
    return "\n\n".join(blocks)


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
