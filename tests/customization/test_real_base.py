"""The slow tier: the real bundled SmolLM2-135M-Instruct, end to end on two CPU threads."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from customization.base_model import FrozenBase, load_base_model, prepare_bundled_base
from customization.config import CarryOnConfig, FeatureConfig, GenerationConfig, TrainingConfig
from customization.datasets import load_dataset
from customization.demo_data import generate_demo_problems
from customization.evaluation import heldout_metrics
from customization.features import extract_features
from customization.generation import generate
from customization.tokenizer import tokenize_examples
from customization.training import build_carry_on
from tests.helpers.carry_on_kit import train_on_base

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "What is 12 times 7?"}]


@pytest.fixture(scope="module")
def real_base() -> Iterator[FrozenBase]:
    """SmolLM2-135M-Instruct from its prepared folder, loaded once for the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    models_dir = os.environ.get("CARRY_ON_MODELS_DIR", str(REPO / "data" / "base_models"))
    yield load_base_model(prepare_bundled_base(models_dir))
    torch.set_num_threads(previous)


def test_lm_head_of_final_hidden_state_equals_smollm2_logits(real_base: FrozenBase) -> None:
    """For SmolLM2 (Llama), hidden_states[-1] is normed: lm_head of it is the logits."""
    ids = torch.tensor([real_base.tokenizer.encode_prompt(MESSAGES)])
    (final,) = real_base.hidden_states(ids, None, [-1])
    with torch.inference_mode():
        logits = real_base.model(input_ids=ids).logits
    assert real_base.model_type == "llama"
    assert real_base.hidden_size == 576
    torch.testing.assert_close(real_base.logits(final), logits, rtol=1e-5, atol=1e-4)


def test_smollm2_tokenizer_adds_no_bos_and_ends_turns_with_im_end(real_base: FrozenBase) -> None:
    """No BOS in front of any encoding; eos is <|im_end|> (id 2), as the model was trained."""
    tokenizer = real_base.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert 2 in tokenizer.stop_token_ids
    prompt = tokenizer.encode_prompt(MESSAGES)
    assert prompt[0] == tokenizer.tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.encode("hello")[0] != 1
    chat = [*MESSAGES, {"role": "assistant", "content": "12 * 7 = 84\n#### 84"}]
    example = tokenizer.encode_chat(chat)
    targets = [t for t, m in zip(example.input_ids, example.target_mask, strict=True) if m]
    assert (
        tokenizer.decode(targets, skip_special_tokens=False) == chat[-1]["content"] + "<|im_end|>"
    )


def test_smollm2_prompt_encoding_matches_transformers(real_base: FrozenBase) -> None:
    """The transformers-free chat tokenizer renders prompts to the same ids as transformers."""
    from transformers import AutoTokenizer

    folder = prepare_bundled_base(os.environ.get("CARRY_ON_MODELS_DIR", REPO / "data/base_models"))
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert real_base.tokenizer.encode_prompt(MESSAGES) == list(expected)


def test_one_epoch_on_demo_problems_lowers_heldout_loss_and_still_answers(
    real_base: FrozenBase, tmp_path: Path
) -> None:
    """Extract fp16 features, train the default carry-on one epoch: held-out loss drops."""
    rows = generate_demo_problems(40, seed=0)
    examples = load_dataset("".join(json.dumps(r) + "\n" for r in rows).encode())
    train_examples, held_out = examples[:32], examples[32:]
    shape = CarryOnConfig()
    config = FeatureConfig(taps=shape.taps, max_length=256, storage_dtype="float16")
    sets = {}
    for name, subset in (("train", train_examples), ("held-out", held_out)):
        tokenized = tokenize_examples(subset, real_base.tokenizer, max_length=256)
        sets[name] = extract_features(real_base, tokenized, config, cache_dir=tmp_path, key=name)
    train_data, held_out_data = sets["train"].load(), sets["held-out"].load()

    carry_on = build_carry_on(shape, width=real_base.hidden_size, seed=0)
    result = train_on_base(
        real_base,
        carry_on,
        train_data,
        TrainingConfig(epochs=1, batch_size=8),
    )
    before = heldout_metrics(real_base, None, held_out_data)
    after = heldout_metrics(real_base, result.carry_on, held_out_data)
    assert after["loss"] < before["loss"]

    question = held_out[0].messages[0]
    prompt = real_base.tokenizer.encode_prompt([question])
    reply = generate(
        real_base, prompt, GenerationConfig(temperature=0.0, max_new_tokens=24), result.carry_on
    )
    assert reply.text.strip()
    assert reply.completion_tokens <= 24


def test_smollm2_prompt_chunks_packed_into_decode_steps_decode_as_alone(
    real_base: FrozenBase,
) -> None:
    """On the real base, a long prompt whose chunks ride in two running rows' decode
    forwards (packed) gives every row the greedy tokens it gives alone."""
    from customization.generation import BatchDecoder

    config = GenerationConfig(temperature=0.0, max_new_tokens=12)
    texts = ["What is 12 times 7?", "Name a prime number."]
    late = real_base.tokenizer.encode_prompt(
        [{"role": "user", "content": "Add the numbers 3, 5, 7, 11 and 13, step by step. " * 4}]
    )
    decoder = BatchDecoder(real_base, prefill_chunk=32, pace_prefill=False)
    running = [
        decoder.new_sequence(
            real_base.tokenizer.encode_prompt([{"role": "user", "content": t}]), config
        )
        for t in texts
    ]
    for sequence in running:
        decoder.add(sequence)
    decoder.step()
    joining = decoder.new_sequence(late, config)
    decoder.add(joining)
    while decoder.active:
        decoder.step()
    assert len(late) > 3 * 32
    assert decoder.counters.packed_forwards >= 3
    assert joining.generated == generate(real_base, late, config).token_ids
    for text, sequence in zip(texts, running, strict=True):
        prompt = real_base.tokenizer.encode_prompt([{"role": "user", "content": text}])
        assert sequence.generated == generate(real_base, prompt, config).token_ids
