"""Training an adapter, a carry-on or a tail, on cached features.

Reads only cached hidden states and the frozen LM head (plus, for a tail, the base's top k
layers): no forward of the base below the adapter happens here. The
cost floor is the LM head (V × D per target token, forward plus the gradient to its input),
so the head runs only at target positions, in chunks, through a fused loss that computes
the gradient in the same pass (two matrix products per chunk, memory flat in V).

Sections, in order: the loss; batches; validation; the training loop (its steps numbered);
checkpoints; building the adapter.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from customization.base_model import BaseFingerprint, FrozenBase
from customization.carry_on import CarryOn
from customization.checkpoint import (
    TRAINER_STATE,
    WEIGHTS_FILE,
    ArtifactInfo,
    checkpoint_path,
    file_sha256,
    latest_checkpoint,
    load_tail_weights,
    save_adapter,
)
from customization.config import CarryOnConfig, TailConfig, TrainingConfig
from customization.durable import replace_durably
from customization.errors import ArtifactError, TrainingCancelled, TrainingDivergedError
from customization.features import FeatureData, FeatureExample
from customization.tail import (
    TailModel,
    build_tail,
    load_tail,
    load_tail_parts,
    tail_parts_from_model,
)

logger = logging.getLogger(__name__)
# What the trainer trains: a carry-on, or a tail (the base's top layers with LoRA).
Trainable = CarryOn | TailModel


# -- the loss ---------------------------------------------------------------------------------


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked over rows.

    The gradient with respect to ``hidden`` is computed during the forward pass, chunk by
    chunk, so no (N, V) logits tensor is ever kept for backward. The weight is frozen.

    Every chunk reuses one (rows, V) buffer (``LogitsBuffer``, kept across steps by the
    training loop) and the softmax is done in it in place: a fresh (rows, V) tensor costs a
    page fault per 4 KiB written, and a separate ``log_softmax`` and ``argmax`` cost two
    more passes over V. The chunks' sizes differ by one row at most, so no small last
    chunk runs the large matrix product inefficiently.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        scratch: LogitsBuffer | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = hidden.shape[0]
        pieces = math.ceil(total / chunk)  # the fewest chunks of at most `chunk` rows ...
        bounds = [round(i * total / pieces) for i in range(pieces + 1)]  # ... sizes within 1
        size = max(b - a for a, b in pairwise(bounds))
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        buffer = (scratch or LogitsBuffer()).take(size, weight.shape[0], hidden.device)
        head = weight.float()  # once, not per chunk (a copy when the head is not fp32)
        for start, end in pairwise(bounds):
            rows = hidden[start:end]
            target = labels[start:end]
            arange = torch.arange(len(target), device=hidden.device)
            logits = buffer[: len(target)]
            torch.mm(rows.float(), head.T, out=logits)  # (n, V)
            top, best = logits.max(dim=-1, keepdim=True)  # (n, 1) each
            correct += (best.squeeze(1) == target).sum()
            picked = logits[arange, target]  # (n,)
            exps = logits.sub_(top).exp_()  # exp(logit - max), in place
            sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
            # log p(target) = logit - max - log(sum of exps)
            loss_sum -= (picked - top.squeeze(1) - sums.squeeze(1).log()).sum()
            if grad is not None:
                probs = exps.div_(sums * total)  # softmax / N: the mean's gradient
                probs[arange, target] -= 1.0 / total
                grad[start:end] = (probs @ head).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        ctx.mark_non_differentiable(correct)
        return loss_sum / max(total, 1), correct

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None


class LogitsBuffer:
    """The (rows, V) float32 scratch of ``head_loss``, kept across calls by its owner.

    A fresh tensor of that size costs a page fault per 4 KiB on first write: measured here
    ~0.18 s per step for SmolLM2's 49k vocabulary, more than the softmax itself. A training
    loop owns one (``chunk`` × V floats, 200 MB at the defaults) and it goes with the loop.
    """

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None

    def take(self, rows: int, columns: int, device: torch.device) -> torch.Tensor:
        held = self._tensor
        if (
            held is None
            or held.shape[0] < rows
            or held.shape[1] != columns
            or held.device != device
        ):
            held = self._tensor = torch.empty((rows, columns), dtype=torch.float32, device=device)
        return held[:rows]


def head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int = 1024,
    scratch: LogitsBuffer | None = None,
) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy, number of argmax-correct tokens) for rows of ``hidden`` (N, D).

    ``scratch``: a buffer to reuse across calls (a training loop's); None allocates one."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    if torch.is_grad_enabled() and hidden.requires_grad:
        loss, correct = _ChunkedHeadLoss.apply(hidden, weight, labels, chunk, scratch)
        return loss, int(correct)
    with torch.no_grad():
        loss, correct = _ChunkedHeadLoss.forward(
            _NoGradContext(), hidden, weight, labels, chunk, scratch
        )
    return loss, int(correct)


class _NoGradContext:
    """Stands in for autograd's ctx when only the loss value is wanted."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *_: torch.Tensor) -> None:
        pass

    def mark_non_differentiable(self, *_: torch.Tensor) -> None:
        pass


# -- batches ----------------------------------------------------------------------------------


@dataclass
class Batch:
    taps: list[torch.Tensor]  # each (B, T, D_i)
    final_state: torch.Tensor | None  # (B, T, D); None when the adapter never reads it
    positions: torch.Tensor  # (B, T)
    lengths: torch.Tensor  # (B,) real tokens of each right-padded row
    loss_rows: torch.Tensor  # (N,) flat indices into B*T of positions that predict a target
    labels: torch.Tensor  # (N,)

    @property
    def n_targets(self) -> int:
        return int(self.labels.shape[0])


def make_batch(
    examples: Sequence[FeatureExample],
    tap_indices: Sequence[int],
    final_index: int | None,
    device: torch.device,
) -> Batch:
    """Right-pad a batch; position t predicts token t+1 where that token is a target."""
    width = max(len(e.input_ids) for e in examples)

    def padded(state_index: int) -> torch.Tensor:
        rows = [e.states[state_index].dequantize() for e in examples]
        out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        for row, values in enumerate(rows):
            out[row, : len(values)] = values
        return out.to(device)

    loss_rows: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for row, example in enumerate(examples):
        predicts = torch.nonzero(example.target_mask[1:]).squeeze(-1)  # positions t
        loss_rows.append(predicts + row * width)
        labels.append(example.input_ids[predicts + 1])
    positions = torch.arange(width, device=device).unsqueeze(0).expand(len(examples), -1)
    return Batch(
        taps=[padded(i) for i in tap_indices],
        final_state=None if final_index is None else padded(final_index),
        positions=positions,
        lengths=torch.tensor([len(e.input_ids) for e in examples], device=device),
        loss_rows=torch.cat(loss_rows).to(device),
        labels=torch.cat(labels).to(device),
    )


def batch_loss(
    model: Trainable | None,
    batch: Batch,
    head_weight: torch.Tensor,
    chunk: int,
    scratch: LogitsBuffer | None = None,
) -> tuple[torch.Tensor, int]:
    """Loss of the customized base on a batch; ``model=None`` scores the base alone."""
    if isinstance(model, TailModel):
        merged = model(batch.taps[0], batch.positions, batch.lengths)  # (B, T, D)
    elif model is None:
        assert batch.final_state is not None
        merged = batch.final_state
    else:
        assert batch.final_state is not None
        merged = model(batch.taps, batch.final_state, batch.positions)  # (B, T, D)
    rows = merged.reshape(-1, merged.shape[-1]).index_select(0, batch.loss_rows)  # (N, D)
    return head_loss(rows, head_weight, batch.labels, chunk=chunk, scratch=scratch)


@dataclass
class FeatureLayout:
    """Where an adapter's inputs sit in a feature set: a carry-on's taps and the final
    state, or a tail's one input state (and no final state)."""

    tap_indices: list[int]
    final_index: int | None

    @classmethod
    def for_taps(
        cls,
        data: FeatureData,
        taps: Sequence[int],
        num_layers: int | Sequence[int],
        tap_bases: Sequence[int] = (),
    ) -> FeatureLayout:
        """``num_layers``: the primary base's depth, or one depth per base when mixing."""
        depths = [num_layers] if isinstance(num_layers, int) else list(num_layers)

        def index_of(base: int, tap: int) -> int:
            hidden = tap + depths[base] + 1 if tap < 0 else tap
            try:
                return data.states.index((base, hidden))
            except ValueError:
                raise ArtifactError(
                    f"the cached features hold no hidden state {tap} of base {base}; "
                    "extract features with this carry-on's taps"
                ) from None

        bases = tuple(tap_bases) or tuple(0 for _ in taps)
        return cls([index_of(b, t) for b, t in zip(bases, taps, strict=True)], index_of(0, -1))

    @classmethod
    def for_config(
        cls, data: FeatureData, config: CarryOnConfig, num_layers: int | Sequence[int]
    ) -> FeatureLayout:
        return cls.for_taps(data, config.taps, num_layers, config.resolved_tap_bases)

    @classmethod
    def for_tail(cls, data: FeatureData, config: TailConfig) -> FeatureLayout:
        try:
            return cls([data.states.index((0, config.first_layer))], None)
        except ValueError:
            raise ArtifactError(
                f"the cached features hold no hidden state {config.first_layer}; "
                f"extract features for a depth-{config.depth} tail"
            ) from None

    @classmethod
    def for_model(
        cls, data: FeatureData, model: Trainable, num_layers: int | Sequence[int]
    ) -> FeatureLayout:
        if isinstance(model, TailModel):
            return cls.for_tail(data, model.config)
        return cls.for_config(data, model.config, num_layers)


def iterate_batches(
    data: FeatureData, order: Sequence[int], batch_size: int
) -> Iterator[list[FeatureExample]]:
    for start in range(0, len(order), batch_size):
        yield [data.examples[i] for i in order[start : start + batch_size]]


# -- validation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    carry_on: Trainable | None,
    data: FeatureData,
    layout: FeatureLayout,
    head_weight: torch.Tensor,
    *,
    batch_size: int = 8,
    chunk: int = 1024,
    scratch: LogitsBuffer | None = None,
) -> dict[str, float]:
    """Held-out mean loss and token accuracy over all target tokens."""
    scratch = scratch or LogitsBuffer()  # one for all batches
    was_training = carry_on.training if carry_on is not None else False
    if carry_on is not None:
        carry_on.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for examples in iterate_batches(data, range(len(data)), batch_size):
        batch = make_batch(examples, layout.tap_indices, layout.final_index, head_weight.device)
        loss, hits = batch_loss(carry_on, batch, head_weight, chunk, scratch)
        loss_sum += float(loss) * batch.n_targets
        correct += hits
        count += batch.n_targets
    if carry_on is not None and was_training:
        carry_on.train()
    return {"loss": loss_sum / max(count, 1), "token_accuracy": correct / max(count, 1)}


# -- the training loop ------------------------------------------------------------------------


@dataclass
class TrainingCallbacks:
    """Hooks the caller (CLI, Celery task) uses to observe and steer a run."""

    on_progress: Callable[[dict[str, Any]], None] | None = None  # every step
    on_metrics: Callable[[dict[str, Any]], None] | None = None  # train/valid metrics
    on_checkpoint: Callable[[int, ArtifactInfo, dict[str, Any]], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass
class TrainingResult:
    carry_on: Trainable  # the trained adapter, whichever kind
    steps: int
    trained_tokens: int
    best_epoch: int
    best_valid_loss: float | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, total: int, config: TrainingConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    warmup = int(total * config.warmup_fraction)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def trainable_parameters(model: Trainable) -> list[torch.nn.Parameter]:
    """A carry-on trains every parameter; a tail only its LoRA matrices."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_weights(model: Trainable) -> dict[str, torch.Tensor]:
    """The weights an artifact stores, under its own names."""
    if isinstance(model, TailModel):
        return model.lora_state_dict()
    return model.state_dict()


def load_trainable_weights(model: Trainable, weights: dict[str, torch.Tensor]) -> None:
    if isinstance(model, TailModel):
        model.load_lora_state_dict(weights)
    else:
        model.load_state_dict(weights)


def _optimizer(model: Trainable, config: TrainingConfig) -> torch.optim.AdamW:
    # No weight decay on norms, biases and the tap mix: it would pull them towards zero.
    decay = [p for p in trainable_parameters(model) if p.dim() >= 2]
    no_decay = [p for p in trainable_parameters(model) if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )


@dataclass
class _State:
    """Everything needed to resume a run exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    trained_tokens: int = 0
    best_epoch: int = -1
    best_valid_loss: float | None = None
    epochs_without_improvement: int = 0
    epoch_loss_sum: float = 0.0  # the current epoch's train loss so far, summed over tokens
    epoch_loss_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None


def train_adapter(
    carry_on: Trainable,
    train_data: FeatureData,
    head_weight: torch.Tensor,
    config: TrainingConfig,
    *,
    num_layers: int | Sequence[int],
    base_fingerprints: Sequence[BaseFingerprint],
    valid_data: FeatureData | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    callbacks: TrainingCallbacks | None = None,
    initial_weights: Mapping[str, torch.Tensor] | None = None,
) -> TrainingResult:
    """Train ``carry_on`` (a carry-on or a tail) in place; returns it holding the best
    weights seen. ``head_weight`` is the base's frozen LM head.

    ``initial_weights`` (a continued fine-tune: the parent adapter's weights, read and
    checked by ``checkpoint.load_initial_weights``) replace the fresh initialisation, so the
    first step starts exactly from the parent. With ``checkpoint_dir`` set, a checkpoint is
    written every ``checkpoint_every`` steps and at each epoch end, and (``resume=True``)
    the run continues from the newest one, which supersedes ``initial_weights``.
    """
    hooks = callbacks or TrainingCallbacks()
    device = head_weight.device
    head_weight = head_weight.detach()
    layout = FeatureLayout.for_model(train_data, carry_on, num_layers)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if initial_weights is not None:
        _start_from(carry_on, initial_weights)
    optimizer = _optimizer(carry_on, config)
    scratch = LogitsBuffer()  # the LM head's logits, reused by every step and validation
    state = _State()
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoints is not None and resume:
        restored = _restore_latest(checkpoints, carry_on, optimizer)
        if restored is not None:
            state = restored
    carry_on.train()
    # 1. Epochs; each epoch's order depends only on (seed, epoch), so a resumed run
    #    replays exactly the batches an uninterrupted one would have seen.
    while state.epoch < config.epochs:
        generator = torch.Generator().manual_seed(config.seed * 1000 + state.epoch)
        order = torch.randperm(len(train_data), generator=generator).tolist()
        started = time.perf_counter()
        epoch_tokens = 0  # trained by this process, for throughput
        if state.batch_in_epoch == 0:
            state.epoch_loss_sum, state.epoch_loss_tokens = 0.0, 0
        batches = list(iterate_batches(train_data, order, config.batch_size))
        for index in range(state.batch_in_epoch, len(batches)):
            # 2. Cooperative cancel between steps.
            if hooks.should_cancel is not None and hooks.should_cancel():
                raise TrainingCancelled("training was cancelled")
            # 3. One optimisation step.
            batch = make_batch(batches[index], layout.tap_indices, layout.final_index, device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, total_steps, config)
            loss, _ = batch_loss(carry_on, batch, head_weight, config.loss_chunk_tokens, scratch)
            if not math.isfinite(loss.item()):  # before the step: the weights stay finite
                raise TrainingDivergedError(
                    f"the training loss became {loss.item()} at step {state.step + 1}; "
                    "lower the learning rate multiplier or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable_parameters(carry_on), config.grad_clip)
            optimizer.step()
            state.step += 1
            state.batch_in_epoch = index + 1
            state.trained_tokens += batch.n_targets
            epoch_tokens += batch.n_targets
            state.epoch_loss_sum += loss.item() * batch.n_targets
            state.epoch_loss_tokens += batch.n_targets
            # 4. Progress, and periodic checkpoints.
            if hooks.on_progress is not None:
                elapsed = time.perf_counter() - started
                hooks.on_progress(
                    {
                        "step": state.step,
                        "total_steps": total_steps,
                        "epoch": state.epoch + (index + 1) / len(batches),
                        "train_loss": loss.item(),
                        "learning_rate": optimizer.param_groups[0]["lr"],
                        "tokens_per_second": epoch_tokens / max(elapsed, 1e-9),
                        "trained_tokens": state.trained_tokens,
                    }
                )
            at_epoch_end = index + 1 == len(batches)
            if (
                checkpoints is not None
                and config.checkpoint_every
                and state.step % config.checkpoint_every == 0
                and not at_epoch_end
            ):
                _save_checkpoint(checkpoints, carry_on, optimizer, state, base_fingerprints, hooks)
        # 5. End of epoch: validation, keep-best, early stopping, checkpoint.
        elapsed = time.perf_counter() - started
        metrics: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch + 1,
            "train_loss": state.epoch_loss_sum / max(state.epoch_loss_tokens, 1),
            "tokens_per_second": epoch_tokens / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
        }
        stop = False
        if valid_data is not None and len(valid_data):
            scores = evaluate(
                carry_on,
                valid_data,
                layout,
                head_weight,
                batch_size=config.batch_size,
                chunk=config.loss_chunk_tokens,
                scratch=scratch,
            )
            metrics.update(valid_loss=scores["loss"], valid_token_accuracy=scores["token_accuracy"])
            stop = _track_best(state, carry_on, scores["loss"], config)
        else:
            state.best_epoch = state.epoch + 1
            state.best_weights = None
        state.history.append(metrics)
        if hooks.on_metrics is not None:
            hooks.on_metrics(metrics)
        state.epoch += 1
        state.batch_in_epoch = 0
        if checkpoints is not None:
            _save_checkpoint(checkpoints, carry_on, optimizer, state, base_fingerprints, hooks)
        if stop:
            break
    # 6. Keep the best weights seen on the validation set.
    if state.best_weights is not None:
        load_trainable_weights(carry_on, state.best_weights)
    carry_on.eval()
    return TrainingResult(
        carry_on=carry_on,
        steps=state.step,
        trained_tokens=state.trained_tokens,
        best_epoch=state.best_epoch,
        best_valid_loss=state.best_valid_loss,
        stopped_early=state.epoch < config.epochs,
        history=state.history,
    )


def _start_from(model: Trainable, weights: Mapping[str, torch.Tensor]) -> None:
    """Put a parent's weights into a freshly built adapter of the same shape."""
    try:
        load_trainable_weights(model, dict(weights))
    except (RuntimeError, ValueError) as exc:  # missing, extra or misshapen tensors
        raise ArtifactError(f"the initial weights do not fit this adapter: {exc}") from exc


def _track_best(
    state: _State, carry_on: Trainable, valid_loss: float, config: TrainingConfig
) -> bool:
    """Record a new best; return True when early stopping should end the run."""
    if state.best_valid_loss is None or valid_loss < state.best_valid_loss:
        state.best_valid_loss = valid_loss
        state.best_epoch = state.epoch + 1
        state.epochs_without_improvement = 0
        weights = trainable_weights(carry_on)
        state.best_weights = {k: v.detach().clone() for k, v in weights.items()}
        return False
    state.epochs_without_improvement += 1
    patience = config.early_stopping_patience
    return bool(patience) and state.epochs_without_improvement >= patience


# -- checkpoints ------------------------------------------------------------------------------


def _save_checkpoint(
    folder: Path,
    carry_on: Trainable,
    optimizer: torch.optim.Optimizer,
    state: _State,
    base_fingerprints: Sequence[BaseFingerprint],
    hooks: TrainingCallbacks,
) -> None:
    """A checkpoint is a servable artifact plus the trainer state to resume from it."""
    target = checkpoint_path(folder, state.step)
    info = save_adapter(carry_on, target, base_fingerprints=base_fingerprints)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for index, param in enumerate(trainable_parameters(carry_on)):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
    for key, value in (state.best_weights or {}).items():
        tensors[f"best.{key}"] = value.detach().to("cpu").contiguous()
    scalars = {
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "step": state.step,
        "trained_tokens": state.trained_tokens,
        "best_epoch": state.best_epoch,
        "best_valid_loss": state.best_valid_loss,
        "epochs_without_improvement": state.epochs_without_improvement,
        "epoch_loss_sum": state.epoch_loss_sum,
        "epoch_loss_tokens": state.epoch_loss_tokens,
        "history": state.history,
    }
    staging = target / f".{TRAINER_STATE}.tmp"
    save_file(tensors, str(staging))
    replace_durably(staging, target / f"{TRAINER_STATE}.safetensors")
    # Checksums of both halves, so a damaged checkpoint is found (and skipped) on resume.
    checksums = {
        "artifact_sha256": info.sha256,
        "state_sha256": file_sha256(target / f"{TRAINER_STATE}.safetensors"),
    }
    json_staging = target / f".{TRAINER_STATE}.json.tmp"
    json_staging.write_text(json.dumps({**scalars, **checksums}), "utf-8")
    # The JSON is written last: its presence marks a complete, resumable checkpoint.
    replace_durably(json_staging, target / f"{TRAINER_STATE}.json")
    if hooks.on_checkpoint is not None:
        hooks.on_checkpoint(state.step, info, state.history[-1] if state.history else {})


def _restore_latest(
    folder: Path, carry_on: Trainable, optimizer: torch.optim.Optimizer
) -> _State | None:
    latest = latest_checkpoint(folder)
    if latest is None:
        return None
    if isinstance(carry_on, TailModel):
        load_tail_weights(carry_on, latest)
    else:
        carry_on.load_state_dict(load_file(str(latest / WEIGHTS_FILE)))
    tensors = load_file(str(latest / f"{TRAINER_STATE}.safetensors"))
    scalars = json.loads((latest / f"{TRAINER_STATE}.json").read_text("utf-8"))
    params = trainable_parameters(carry_on)
    for index, param in enumerate(params):
        entries = {
            key.split(".", 2)[2]: value
            for key, value in tensors.items()
            if key.startswith(f"optim.{index}.")
        }
        if entries:
            # AdamW keeps its step counter on the CPU; moments live with the parameter.
            optimizer.state[param] = {
                key: value if key == "step" else value.to(param.device)
                for key, value in entries.items()
            }
    torch.set_rng_state(tensors["rng.torch"])
    best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
    return _State(
        epoch=scalars["epoch"],
        batch_in_epoch=scalars["batch_in_epoch"],
        step=scalars["step"],
        trained_tokens=scalars["trained_tokens"],
        best_epoch=scalars["best_epoch"],
        best_valid_loss=scalars["best_valid_loss"],
        epochs_without_improvement=scalars["epochs_without_improvement"],
        epoch_loss_sum=scalars.get("epoch_loss_sum", 0.0),
        epoch_loss_tokens=scalars.get("epoch_loss_tokens", 0),
        history=scalars["history"],
        best_weights=best or None,
    )


# -- building the adapter (a training node's model) -------------------------------------------


def build_carry_on(config: CarryOnConfig, *, width: int, seed: int) -> CarryOn:
    """A freshly initialised carry-on for a base of hidden size ``width`` (every tap reads
    that base), deterministic for ``seed``: the one place a carry-on is built from a config.
    """
    torch.manual_seed(seed)
    return CarryOn(config.resolved(tap_sizes=(width,) * len(config.taps), hidden_size=width))


def build_adapter(base: FrozenBase, config: CarryOnConfig | TailConfig, *, seed: int) -> Trainable:
    """A fresh adapter of either kind for a base loaded in this process (CLI, demo, bench).

    A training node that must not hold the whole base builds a tail with
    ``customization.tail.load_tail`` instead, from the base's files.
    """
    if isinstance(config, TailConfig):
        parts = tail_parts_from_model(base.model, config.depth)
        return build_tail(config, parts, seed=seed).to(base.device)
    return build_carry_on(config, width=base.hidden_size, seed=seed).to(base.device)


def load_training_node(
    base_dir: str | Path,
    config: CarryOnConfig | TailConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[Trainable, torch.Tensor]:
    """What a training node holds, read from the base's folder: a fresh adapter and the
    frozen LM head (V, D). A carry-on needs only the head; a tail its top layers, the final
    norm and the head. The base's other weights are never read.
    """
    from transformers import AutoConfig

    if isinstance(config, TailConfig):
        tail, head = load_tail(base_dir, config, seed=seed, device=str(device))
        return tail, head
    hf_config = AutoConfig.from_pretrained(base_dir)
    head = load_tail_parts(base_dir, 1, head_only=True, device=str(device)).head_weight
    width = int(hf_config.hidden_size)
    carry_on = build_carry_on(config, width=width, seed=seed)
    return carry_on.to(device), head
