"""The PEFT LoRA side of the comparison, trained on exactly what the carry-on sees.

Same tokenized examples, same assistant-only targets (equivalent to HF ``labels`` with -100
outside assistant tokens), same batch order, batch size, optimizer family (AdamW, betas
0.9/0.95, weight decay on matrices), warmup + cosine schedule (``lr_at``) and gradient
clipping. The loss uses the carry-on's own chunked head loss at target positions only, with
its logits buffer kept across steps, so LoRA is not charged for prompt or padding logits:
the head is as lean as ours.

What the baseline does not get is padding-free packing: PEFT runs transformers' padded
batches (8 GSM8K chat examples are ~28 % padding), as every PEFT recipe on a CPU does;
packing them for transformers needs flash-attention's variable-length kernels (GPU only) or
a block-diagonal mask over the whole batch, which costs more attention than it saves. Our
tail packs its rows (``customization.packed.Sequences``); the benchmark's tail at k = L, the
same arithmetic as LoRA on all layers, shows what that alone is worth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from customization.config import TrainingConfig
from customization.tokenizer import TokenizedExample
from customization.training import LogitsBuffer, head_loss, lr_at

LORA_TARGETS: dict[str, list[str]] = {
    "lora-qv": ["q_proj", "v_proj"],
    "lora-all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_RANK = 8
LORA_ALPHA = 16
LORA_LEARNING_RATE = 2e-4  # the usual LoRA learning rate; the carry-on keeps its default


def lora_config(name: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS[name]
    )


def load_hf_model(base_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lora_model(base_dir: Path, name: str, *, seed: int) -> Any:
    """A PeftModel with one freshly initialised LoRA adapter (B = 0, as PEFT starts)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(load_hf_model(base_dir), lora_config(name))


def lora_batch(
    examples: Sequence[TokenizedExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, plus flat loss rows and labels, as ``make_batch`` builds."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    rows: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for row, example in enumerate(examples):
        tokens = torch.tensor(example.input_ids)
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        predicts = torch.nonzero(torch.tensor(example.target_mask[1:])).squeeze(-1)
        rows.append(predicts + row * width)
        labels.append(tokens[predicts + 1])
    return ids, attention, torch.cat(rows), torch.cat(labels)


def lora_loss(
    model: Any,
    examples: Sequence[TokenizedExample],
    pad_id: int,
    chunk: int,
    scratch: LogitsBuffer | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean assistant-token loss of a batch through the whole (adapted) base."""
    ids, attention, rows, labels = lora_batch(examples, pad_id)
    decoder = model.get_base_model().get_decoder()
    hidden = decoder(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, D)
    head = model.get_base_model().get_output_embeddings().weight.detach()
    loss, _ = head_loss(flat, head, labels, chunk=chunk, scratch=scratch)
    return loss, int(labels.shape[0])


@torch.no_grad()
def lora_heldout_loss(
    model: Any, examples: Sequence[TokenizedExample], pad_id: int, config: TrainingConfig
) -> float:
    """Held-out loss: mean over all assistant tokens, as ``training.evaluate`` computes it."""
    model.eval()
    total, count = 0.0, 0
    scratch = LogitsBuffer()
    for start in range(0, len(examples), config.batch_size):
        batch = examples[start : start + config.batch_size]
        loss, n = lora_loss(model, batch, pad_id, config.loss_chunk_tokens, scratch)
        total += float(loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def train_lora(
    model: Any,
    train: Sequence[TokenizedExample],
    held_out: Sequence[TokenizedExample],
    pad_id: int,
    config: TrainingConfig,
    on_epoch: Callable[[dict[str, Any]], None],
) -> None:
    """Train the adapter in place; ``on_epoch`` gets wall time and held-out loss per epoch."""
    scratch = LogitsBuffer()  # the LM head's logits reused across steps, as our trainer does
    train_adapter(
        [p for p in model.parameters() if p.requires_grad],
        train,
        lambda batch: lora_loss(model, batch, pad_id, config.loss_chunk_tokens, scratch),
        lambda: lora_heldout_loss(model, held_out, pad_id, config),
        config,
        on_epoch,
        modules=[model],
    )


def train_adapter(
    trainable: Sequence[torch.nn.Parameter],
    train: Sequence[Any],
    batch_loss: Callable[[list[Any]], tuple[torch.Tensor, int]],
    held_out_loss: Callable[[], float],
    config: TrainingConfig,
    on_epoch: Callable[[dict[str, Any]], None],
    *,
    modules: Sequence[torch.nn.Module],
) -> None:
    """The baselines' training loop, the carry-on's recipe: AdamW (betas 0.9/0.95, weight
    decay on matrices), ``lr_at``'s warmup + cosine, gradient clipping, and the carry-on's
    epoch order (same seed formula, so every method sees the same batches)."""
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    total_steps = math.ceil(len(train) / config.batch_size) * config.epochs
    step = 0
    for epoch in range(config.epochs):
        for module in modules:
            module.train()
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=generator).tolist()
        started = time.perf_counter()
        for start in range(0, len(order), config.batch_size):
            batch = [train[i] for i in order[start : start + config.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, config)
            loss, _ = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            step += 1
        seconds = time.perf_counter() - started
        for module in modules:
            module.eval()
        on_epoch({"epoch": epoch + 1, "epoch_seconds": seconds, "valid_loss": held_out_loss()})


def artifact_nbytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
