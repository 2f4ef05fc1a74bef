"""Small building blocks for the carry-on core's tests: bases, toy data, perturbed carry-ons."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.config import CarryOnConfig, TrainingConfig
from customization.datasets import Example
from customization.features import FeatureData
from customization.tail import TailModel
from customization.training import Trainable, TrainingResult, build_carry_on, train_adapter
from tests.helpers.tiny_models import tiny_base

# Two short epochs checkpointing every 2 steps: a run to stop part-way and resume.
RESUMABLE = TrainingConfig(
    epochs=2, batch_size=2, learning_rate=1e-2, warmup_fraction=0.25, seed=3, checkpoint_every=2
)
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "comet", "maple", "ocean")


def lively_base(*, seed: int = 0, name: str = "tiny") -> FrozenBase:
    """A tiny random base whose weights are large enough that greedy decoding varies.

    With the default init (std 0.02) a tiny random Llama repeats one token forever, which
    would make token-for-token comparisons of decoders trivially true.
    """
    base = tiny_base(seed=seed, name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in base.model.named_parameters():
            if param.dim() == 2:
                std = 1.0 if "embed" in param_name else 0.3
                param.normal_(0.0, std, generator=generator)
    return base


def tiny_config(**overrides: Any) -> CarryOnConfig:
    """A carry-on shape small enough for sub-second tests.

    It reads the final state unless told otherwise: the default taps name layers of the
    bundled 30-layer base, which a two-layer test base does not have.
    """
    values: dict[str, Any] = {
        "d_model": 16,
        "n_blocks": 2,
        "n_heads": 2,
        "taps": (-1,),
        "tap_mode": "mix",
        **overrides,
    }
    return CarryOnConfig(**values)


def new_carry_on(base: FrozenBase, config: CarryOnConfig, *, seed: int = 0) -> CarryOn:
    """A freshly initialised carry-on for ``base`` (every tap reads the primary base)."""
    return build_carry_on(config, width=base.hidden_size, seed=seed)


def perturb(carry_on: CarryOn, *, seed: int, scale: float = 0.5) -> CarryOn:
    """Move every weight away from its initial value, so the carry-on changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in carry_on.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return carry_on.eval()


def perturb_tail(tail: TailModel, *, seed: int, scale: float = 0.5) -> TailModel:
    """Move every LoRA B off zero, so the tail changes outputs (B = 0 is the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in tail.lora_modules():
            weight = module.lora_B.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    return tail


def toy_examples(n: int, *, seed: int = 0) -> list[Example]:
    """Chats whose answers follow a simple rule (repeat the word twice), one per line."""
    rng = random.Random(seed)
    examples = []
    for index in range(n):
        word = rng.choice(_WORDS)
        messages = (
            {"role": "user", "content": f"repeat {word}"},
            {"role": "assistant", "content": f"{word} {word}"},
        )
        examples.append(Example(messages=messages, line=index + 1))
    return examples


def toy_jsonl(n: int, *, seed: int = 0) -> bytes:
    """``toy_examples`` as an OpenAI chat JSONL upload."""
    rows = [{"messages": list(e.messages)} for e in toy_examples(n, seed=seed)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def save_hf_base(base: FrozenBase, folder: Path) -> Path:
    """Write ``base`` as a plain HF folder: model weights plus a tokenizer folder."""
    base.model.save_pretrained(folder, safe_serialization=True)
    base.tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "chat_template": base.tokenizer.chat_template,
        "eos_token": base.tokenizer.eos_token,
        "pad_token": base.tokenizer.pad_token,
        "add_bos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), "utf-8")
    return folder


def train_on_base(
    base: FrozenBase, adapter: Trainable, data: FeatureData, config: TrainingConfig, **options: Any
) -> TrainingResult:
    """``train_adapter`` against ``base`` (its LM head, depth and fingerprint); ``options`` are
    train_adapter's own keywords (``valid_data``, ``checkpoint_dir``, ``callbacks``, ...)."""
    return train_adapter(
        adapter,
        data,
        base.head_weight,
        config,
        num_layers=base.num_layers,
        base_fingerprints=[base.fingerprint()],
        **options,
    )
