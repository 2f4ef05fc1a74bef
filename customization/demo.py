"""The headless demo: the whole carry-on story on generated arithmetic problems.

Prepare the bundled base, generate word problems with worked solutions, extract hidden
states once, train a 2-block carry-on, then compare base and base + carry-on on held-out
problems (assistant-token loss, final-answer exact match, two sample answers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from customization.base_model import load_base_model, prepare_bundled_base
from customization.checkpoint import load_carry_on
from customization.config import CarryOnConfig, GenerationConfig, TrainingConfig
from customization.datasets import load_dataset
from customization.demo_data import generate_demo_problems
from customization.evaluation import exact_match, features_in_memory, heldout_metrics
from customization.generation import generate
from customization.pipeline import train_pipeline
from customization.tokenizer import tokenize_examples

HELD_OUT_SEED = 10_001


def _jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def run_demo(
    *,
    models_dir: Path,
    work_dir: Path,
    n_problems: int = 500,
    n_held_out: int = 48,
    epochs: int = 3,
    device: str = "cpu",
) -> int:
    started = time.perf_counter()
    print(f"1. preparing the bundled base in {models_dir} ...", flush=True)
    base = load_base_model(prepare_bundled_base(models_dir), device=device)
    print(f"   {base.name}: {base.num_layers} layers, width {base.hidden_size}")

    print(f"2. generating {n_problems} training and {n_held_out} held-out problems ...")
    train_bytes = _jsonl(generate_demo_problems(n_problems, seed=0))
    held_out = load_dataset(_jsonl(generate_demo_problems(n_held_out, seed=HELD_OUT_SEED)))

    print("3. extracting hidden states once, then training a 2-block carry-on ...", flush=True)
    summary = train_pipeline(
        base,
        train_bytes,
        carry_on_config=CarryOnConfig(),
        training_config=TrainingConfig(epochs=epochs),
        max_length=384,
        storage_dtype="float16",
        cache_dir=work_dir / "features",
        out=work_dir / "run",
        valid_fraction=0.05,
    )
    carry_on = load_carry_on(summary["adapter"], base_fingerprints=[base.fingerprint()])
    print(
        f"   extraction {summary['extraction_seconds']:.0f} s, training "
        f"{summary['training_seconds']:.0f} s, carry-on {summary['parameters']:,} parameters "
        f"({summary['bytes'] / 1e6:.1f} MB)"
    )

    print("4. held-out evaluation ...", flush=True)
    tokenized = tokenize_examples(held_out, base.tokenizer, max_length=384)
    data = features_in_memory(base, tokenized, carry_on.config.taps)
    before = heldout_metrics(base, None, data)
    after = heldout_metrics(base, carry_on, data)
    n_match = min(len(held_out), 32)
    em_before = exact_match(base, None, held_out[:n_match], max_new_tokens=192).accuracy
    em_after = exact_match(base, carry_on, held_out[:n_match], max_new_tokens=192).accuracy
    print(f"   {'':24}{'base':>10}{'+ carry-on':>12}")
    print(f"   {'held-out loss':24}{before['loss']:>10.3f}{after['loss']:>12.3f}")
    print(
        f"   {'token accuracy':24}{before['token_accuracy']:>10.3f}{after['token_accuracy']:>12.3f}"
    )
    print(f"   {f'exact match ({n_match})':24}{em_before:>10.3f}{em_after:>12.3f}")

    print("5. two sample answers")
    config = GenerationConfig(temperature=0.0, max_new_tokens=192)
    for example in held_out[:2]:
        question = example.messages[0]["content"]
        prompt = base.tokenizer.encode_prompt([{"role": "user", "content": question}])
        print(f"\n   Q: {question}")
        print(f"   base:       {generate(base, prompt, config).text.strip()}")
        print(f"   + carry-on: {generate(base, prompt, config, carry_on).text.strip()}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; adapter at {summary['adapter']}")
    return 0
