"""The carry-on core: plain Python + torch/transformers, no web framework.

A *carry-on* is a small branch of transformer blocks trained on the hidden states of a
frozen base model (GPT Carry-On, arXiv 2504.07513). Modules, in pipeline order:

- ``base_model``  load, freeze and fingerprint a base; prepare the bundled SmolLM2 offline
- ``datasets``    parse and validate JSONL datasets (three formats, line-numbered errors)
- ``tokenizer``   chat template + tokenization with an assistant-only loss mask (no torch)
- ``features``    extract hidden states once into a content-addressed cache
- ``carry_on``    the module itself; ``checkpoint`` saves/loads it safely
- ``training``    train a carry-on on cached features
- ``generation``  decode with base + carry-on KV caches; ``serving`` batches requests
- ``evaluation``  held-out loss, token accuracy, final-answer exact match

Importing this package (or ``datasets``/``tokenizer``/``config``/``errors``) does not
import torch, so the web process can validate uploads cheaply.
"""
