"""Shared fixtures for the carry-on core: tiny random bases and toy feature sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Import transformers' Llama at collection, so that no single test pays its import time.
import transformers.models.llama.modeling_llama  # noqa: F401

from customization.base_model import FrozenBase
from customization.config import FeatureConfig
from customization.features import FeatureData, extract_features
from customization.tokenizer import ChatTokenizer, TokenizedExample, tokenize_examples
from tests.helpers.carry_on_kit import lively_base, save_hf_base, toy_examples
from tests.helpers.tiny_models import tiny_tokenizer

# Hidden states every toy feature set holds: the embeddings, layer 1 and the final state,
# so "mix" and "ladder" carry-ons with intermediate taps can all train on them.
TOY_TAPS = (0, 1, -1)


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, which slow them down on a busy box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def tokenizer() -> ChatTokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="package")
def base() -> FrozenBase:
    """The shared tiny base (2 layers, width 32). Tests must not modify it."""
    return lively_base(seed=0)


@pytest.fixture(scope="package")
def other_base() -> FrozenBase:
    """A base of the same shape and tokenizer but other weights (another fingerprint)."""
    return lively_base(seed=1, name="other")


@pytest.fixture(scope="package")
def toy_tokenized(base: FrozenBase) -> list[TokenizedExample]:
    return tokenize_examples(toy_examples(12), base.tokenizer, max_length=64)


@pytest.fixture(scope="package")
def toy_features(
    base: FrozenBase,
    toy_tokenized: list[TokenizedExample],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[FeatureData, FeatureData]:
    """(train, valid) float32 features of the toy set: 8 training and 4 held-out examples."""
    cache = tmp_path_factory.mktemp("features")
    config = FeatureConfig(taps=TOY_TAPS, max_length=64, storage_dtype="float32", batch_size=4)
    train = extract_features(base, toy_tokenized[:8], config, cache_dir=cache, key="train")
    valid = extract_features(base, toy_tokenized[8:], config, cache_dir=cache, key="valid")
    return train.load(), valid.load()


@pytest.fixture(scope="package")
def hf_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as an HF folder (save_pretrained + tokenizer.json/config)."""
    folder = tmp_path_factory.mktemp("hf-base") / "tiny-llama"
    folder.mkdir()
    return save_hf_base(lively_base(seed=2), folder)
