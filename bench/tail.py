"""A base-initialised tail: the quality study's answer to "what does a frozen reader miss?"

Every carry-on that only *reads* frozen states lands at the same held-out loss however it
reads them (docs/carry_on_quality.md), while LoRA on all linear layers, which changes what
the layers compute, does clearly better. This probe measures how much of that gap comes
back when the branch is not a fresh small network but **copies of the base's own top k
layers**, re-run from the cached state ``hidden_states[L - k]`` with PEFT LoRA (r = 8, every
linear layer) on them, then the base's final norm and frozen LM head:

    hidden_states[L-k] ──> base layers L-k+1 .. L (+ LoRA) ──> final norm ──> lm_head

At initialisation (LoRA's B = 0) this reproduces the base exactly, as a carry-on must; the
run checks it (``init_valid_loss`` equals the base's held-out loss). It trains on the same
cached features, batches, schedule and loss as the carry-on (``bench.lora.train_adapter``).

It is a study, not a product path: serving it would mean re-running the top k layers per
adapter instead of the base's own (a different engine), and its training cost grows with
k × a full-width layer per token, which the results table shows against the cost lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.lora import LORA_ALPHA, LORA_RANK, LORA_TARGETS, artifact_nbytes, load_hf_model
from customization.config import TrainingConfig
from customization.features import FeatureData, FeatureExample
from customization.training import head_loss, make_batch


class Tail:
    """The top ``layers`` decoder layers of an HF Llama-style base, LoRA on each linear."""

    def __init__(self, base_dir: Path, layers: int, *, seed: int):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = load_hf_model(base_dir)
        depth = int(model.config.num_hidden_layers)
        if not 1 <= layers <= depth:
            raise ValueError(f"a tail of {layers} layers does not fit a {depth}-layer base")
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS["lora-all"],
            layers_to_transform=list(range(depth - layers, depth)),
        )
        self.model = get_peft_model(model, config)
        decoder = self.model.get_base_model().get_decoder()
        # Only the tail runs; the lower layers are dropped so the process holds what a
        # training node would (the tail, the norm, the tied embedding / LM head).
        decoder.layers = torch.nn.ModuleList(list(decoder.layers)[depth - layers :])
        self.decoder = decoder
        self.head = self.model.get_base_model().get_output_embeddings().weight.detach()
        self.input_state = depth - layers  # hidden_states index the tail starts from
        self.depth = depth

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Right-padded states (B, T, D) -> the final normed state (B, T, D).

        No padding mask is needed: with right padding and causal attention no real token
        ever attends to a pad.
        """
        hidden = states
        position_embeddings = self.decoder.rotary_emb(hidden, positions)
        for layer in self.decoder.layers:
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=positions,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        normed: torch.Tensor = self.decoder.norm(hidden)
        return normed

    def loss(self, examples: Sequence[FeatureExample], chunk: int) -> tuple[torch.Tensor, int]:
        """Mean assistant-token loss of a batch whose only stored state is ``input_state``.

        ``make_batch`` also wants the final state; the tail never reads it, so it is given
        the same index instead of loading the final state for nothing.
        """
        batch = make_batch(examples, [0], 0, self.head.device)
        merged = self.forward(batch.taps[0], batch.positions[:1])
        rows = merged.reshape(-1, merged.shape[-1]).index_select(0, batch.loss_rows)
        loss, _ = head_loss(rows, self.head, batch.labels, chunk=chunk)
        return loss, batch.n_targets

    @torch.no_grad()
    def held_out_loss(self, data: FeatureData, config: TrainingConfig) -> float:
        total, count = 0.0, 0
        for start in range(0, len(data), config.batch_size):
            batch = data.examples[start : start + config.batch_size]
            loss, n = self.loss(batch, config.loss_chunk_tokens)
            total += float(loss) * n
            count += n
        return total / max(count, 1)

    def save(self, folder: Path) -> dict[str, Any]:
        self.model.save_pretrained(folder)
        return {
            "parameters": sum(p.numel() for p in self.trainable),
            "artifact_bytes": artifact_nbytes(folder),
        }
