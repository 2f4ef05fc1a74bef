"""Tiny random models and tokenizers for fast ML unit tests (no downloads)."""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from customization.tokenizer import CHATML_TEMPLATE, ChatTokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> ChatTokenizer:
    """A byte-level BPE with no merges: 256 byte tokens plus ChatML's special tokens."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(byte_map):
        vocab[symbol] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return ChatTokenizer(backend, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>")


def tiny_base(*, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, name: str = "tiny"):
    """A frozen random Llama over the tiny tokenizer, deterministic for ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from customization.base_model import FrozenBase

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    return FrozenBase(model, tokenizer, name=name, revision="")
