"""Greedy final-answer exact match on held-out GSM8K problems, for every kind of model.

The base and base + carry-on decode through our own batch decoder
(``customization.evaluation.exact_match``); a PEFT LoRA model through ``generate`` with the
same prompts (the chat template up to the reference answer), left-padded batches, greedy.
Both score with the same answer extraction, so the figures compare.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from customization.datasets import Example


def _carry_on_predictions(
    base_dir: Path, adapter: str | None, examples: list[Example], max_new_tokens: int
) -> tuple[list[str], list[str]]:
    from customization.base_model import load_base_model
    from customization.checkpoint import load_carry_on
    from customization.evaluation import exact_match

    base = load_base_model(base_dir)
    carry_on = None
    if adapter:
        carry_on = load_carry_on(adapter, base_fingerprints=[base.fingerprint()])
    result = exact_match(base, carry_on, examples, max_new_tokens=max_new_tokens)
    return result.predictions, result.references


def _lora_predictions(
    base_dir: Path, adapter: str, examples: list[Example], max_new_tokens: int, batch_size: int = 8
) -> tuple[list[str], list[str]]:
    from peft import PeftModel

    from bench.lora import load_hf_model
    from customization.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer.from_dir(base_dir)
    model = PeftModel.from_pretrained(load_hf_model(base_dir), adapter).eval()
    eos = list(tokenizer.stop_token_ids)
    predictions: list[str] = []
    references: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = []
        for example in examples[start : start + batch_size]:
            messages = list(example.messages)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(tokenizer.encode_prompt(messages[:last]))
            references.append(messages[last]["content"])
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), len(row))
            predictions.append(tokenizer.decode(row[:stop]))
    return predictions, references


def exact_match_run(
    base_dir: Path,
    held_out: bytes,
    *,
    kind: str,
    adapter: str | None,
    n: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Exact match of the first ``n`` held-out problems; ``kind``: base, carry_on or lora."""
    from customization.answers import exact_match_rate
    from customization.datasets import load_dataset

    examples = list(load_dataset(held_out))[:n]
    started = time.perf_counter()
    if kind == "lora":
        assert adapter is not None
        predictions, references = _lora_predictions(base_dir, adapter, examples, max_new_tokens)
    else:
        predictions, references = _carry_on_predictions(base_dir, adapter, examples, max_new_tokens)
    accuracy = exact_match_rate(predictions, references)
    return {
        "exact_match": accuracy,
        "hits": round(accuracy * len(examples)),
        "n": len(examples),
        "seconds": time.perf_counter() - started,
        "max_new_tokens": max_new_tokens,
        "samples": [
            {"prediction": p, "reference": r}
            for p, r in list(zip(predictions, references, strict=True))[:3]
        ],
    }
