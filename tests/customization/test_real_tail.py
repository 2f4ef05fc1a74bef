"""Tails on the real bundled SmolLM2: a standard PEFT artifact, and LoRA's own quality."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.lora import load_hf_model, lora_heldout_loss, train_lora
from customization.base_model import FrozenBase, load_base_model, prepare_bundled_base
from customization.checkpoint import load_tail_adapter, save_tail
from customization.config import FeatureConfig, TailConfig, TrainingConfig
from customization.datasets import load_dataset
from customization.demo_data import generate_demo_problems
from customization.features import FeatureData, extract_features
from customization.generation import prompt_logits
from customization.tail import TailModel
from customization.tokenizer import TokenizedExample, tokenize_examples
from customization.training import FeatureLayout, build_adapter, evaluate
from tests.helpers.carry_on_kit import perturb_tail, train_on_base

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    models_dir = os.environ.get("CARRY_ON_MODELS_DIR", str(REPO / "data" / "base_models"))
    yield prepare_bundled_base(models_dir)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def real_base(base_dir: Path) -> FrozenBase:
    return load_base_model(base_dir)


def test_our_tail_artifact_loads_in_peft_with_our_engine_logits(
    base_dir: Path, real_base: FrozenBase, tmp_path: Path
) -> None:
    """PeftModel.from_pretrained reads the folder as it is; its logits equal the engine's."""
    from peft import PeftModel

    tail = build_adapter(real_base, TailConfig(depth=6), seed=0)
    assert isinstance(tail, TailModel)
    perturb_tail(tail, seed=1, scale=0.02)
    info = save_tail(tail, tmp_path / "tail", base_fingerprints=[real_base.fingerprint()])
    prompt = real_base.tokenizer.encode_prompt([{"role": "user", "content": "What is 12*7?"}])
    served = load_tail_adapter(info.path, base_fingerprints=[real_base.fingerprint()])
    ours = prompt_logits(real_base, prompt, served)

    peft_model = PeftModel.from_pretrained(load_hf_model(base_dir), str(info.path)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([prompt])).logits[0].float()
    base_logits = prompt_logits(real_base, prompt)
    assert (ours - base_logits).abs().max() > 1e-2, "the tail should change the logits"
    # The engine's base runs its head and MLPs on prepacked oneDNN kernels, PEFT's model on
    # MKL's: the same products summed in another order, a few float32 roundings apart.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=5e-4)


def _features(
    base: FrozenBase, examples: list[TokenizedExample], layer: int, folder: Path, key: str
) -> FeatureData:
    config = FeatureConfig(
        taps=(layer,), max_length=256, storage_dtype="float32", include_final=False
    )
    return extract_features(base, examples, config, cache_dir=folder, key=key).load()


def test_a_depth_l_tail_matches_peft_lora_on_all_layers(
    base_dir: Path, real_base: FrozenBase, tmp_path: Path
) -> None:
    """A tail over every layer, trained from the cached embeddings by the product's trainer,
    reaches the held-out loss of PEFT LoRA-all trained through the base (same init, same
    batches, same schedule) within 1 %."""
    from peft import get_peft_model, set_peft_model_state_dict

    rows = generate_demo_problems(24, seed=3)
    examples = load_dataset("".join(json.dumps(r) + "\n" for r in rows).encode())
    tokenized = tokenize_examples(examples, real_base.tokenizer, max_length=256)
    train, held_out = tokenized[:16], tokenized[16:]  # two steps: the trajectories match
    training = TrainingConfig(epochs=1, batch_size=8, learning_rate=1e-3, seed=0)
    config = TailConfig(depth=real_base.num_layers)

    tail = build_adapter(real_base, config, seed=0)
    assert isinstance(tail, TailModel)
    initial = {k: v.detach().clone() for k, v in tail.lora_state_dict().items()}
    train_data = _features(real_base, train, 0, tmp_path, "train")
    held_out_data = _features(real_base, held_out, 0, tmp_path, "held-out")
    train_on_base(
        real_base,
        tail,
        train_data,
        training,
    )
    layout = FeatureLayout.for_tail(held_out_data, tail.config)
    ours = evaluate(tail, held_out_data, layout, real_base.head_weight)["loss"]

    from peft import LoraConfig

    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=int(config.alpha),
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
    )
    lora = get_peft_model(load_hf_model(base_dir), peft_config)
    set_peft_model_state_dict(lora, initial)  # the same starting point as the tail
    pad = real_base.tokenizer.pad_token_id
    train_lora(lora, train, held_out, pad, training, on_epoch=lambda _: None)
    theirs = lora_heldout_loss(lora, held_out, pad, training)
    base_loss = lora_heldout_loss(
        get_peft_model(load_hf_model(base_dir), peft_config), held_out, pad, training
    )
    assert ours < base_loss
    assert abs(ours - theirs) / theirs < 0.01
