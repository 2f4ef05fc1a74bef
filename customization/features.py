"""Feature extraction: run the frozen base once, cache its hidden states on disk.

This is where the paper's "outsource the training job to inference nodes" becomes real:
extraction needs the whole base, training afterwards needs only these cached states and the
base's LM head. A feature set lives in ``<cache_dir>/<key>/`` as safetensors shards plus a
``manifest.json``; the key hashes everything that changes the states (base fingerprints,
dataset, taps, max length, chat template, storage dtype), so a second request for the same
key runs no base forward at all.

Shard layout (ragged, no padding stored): ``input_ids`` and ``target_mask`` are the
concatenated token rows, ``offsets`` the start of each example, and ``state.<i>`` the hidden
states of stored state i (plus ``state.<i>.scale`` for the int8 bridge).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from customization.base_model import FrozenBase
from customization.config import FeatureConfig
from customization.durable import replace_durably
from customization.errors import ArtifactError, IncompatibleBaseModelError, TrainingCancelled
from customization.tokenizer import TokenizedExample

MANIFEST = "manifest.json"
FEATURES_FORMAT_VERSION = 1

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

_STORAGE = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def feature_cache_key(
    *,
    base_keys: Sequence[str],
    dataset_sha256: str,
    config: FeatureConfig,
    tap_bases: Sequence[int] = (),
) -> str:
    """Content address of a feature set.

    ``base_keys`` are the bases' fingerprint keys, which already cover the tokenizer
    vocabulary and chat template; ``tap_bases`` says which base each tap reads when
    several bases are mixed.
    """
    payload: dict[str, object] = {
        "bases": list(base_keys),
        "dataset": dataset_sha256,
        "taps": list(config.taps),
        "max_length": config.max_length,
        "dtype": config.storage_dtype,
        "version": FEATURES_FORMAT_VERSION,
    }
    if not config.include_final:  # only then, so the keys of earlier caches stay the same
        payload["final"] = False
    if any(tap_bases):
        payload["tap_bases"] = list(tap_bases)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


def stored_states(
    taps: Sequence[int], tap_bases: Sequence[int], num_layers: int, *, include_final: bool = True
) -> list[tuple[int, int]]:
    """The (base index, hidden-state index) pairs to store, taps already resolved: every
    tap plus (``include_final``) the primary base's final state, which a carry-on's merge
    needs and a tail does not; duplicates once."""
    wanted = list(zip(tap_bases, taps, strict=True))
    if include_final:
        wanted.append((0, num_layers))
    return list(dict.fromkeys(wanted))


@dataclass
class FeatureSet:
    """A cached feature set on disk, described by its manifest."""

    path: Path
    manifest: dict[str, Any]
    extracted: bool = False  # True when this call ran the base (a cache miss)

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def n_examples(self) -> int:
        return int(self.manifest["n_examples"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_target_tokens(self) -> int:
        return int(self.manifest["n_target_tokens"])

    @property
    def states(self) -> list[tuple[int, int]]:
        return [(int(b), int(i)) for b, i in self.manifest["states"]]

    @property
    def state_sizes(self) -> list[int]:
        return [int(s) for s in self.manifest["state_sizes"]]

    @property
    def nbytes(self) -> int:
        return int(self.manifest["bytes"])

    @classmethod
    def open(cls, path: str | Path) -> FeatureSet:
        folder = Path(path)
        manifest_file = folder / MANIFEST
        if not manifest_file.is_file():
            raise ArtifactError(f"no feature set at {folder}")
        manifest = json.loads(manifest_file.read_text("utf-8"))
        if manifest.get("format_version") != FEATURES_FORMAT_VERSION:
            raise ArtifactError(f"feature set {folder} has an unknown format version")
        return cls(folder, manifest)

    def check_base(self, base_keys: Sequence[str]) -> None:
        if list(base_keys) != list(self.manifest["base_keys"]):
            raise IncompatibleBaseModelError(
                "these cached features were extracted from a different base model"
            )

    def state_index(self, base_index: int, hidden_index: int) -> int:
        try:
            return self.states.index((base_index, hidden_index))
        except ValueError:
            raise IncompatibleBaseModelError(
                f"feature set {self.key} holds no hidden state {hidden_index} of base "
                f"{base_index}; extract with that tap"
            ) from None

    def iter_shards(self, states: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors; with ``states`` (indices into ``self.states``) only those
        states are read from disk, plus the token ids, masks and offsets."""
        for name in self.manifest["shards"]:
            try:
                if states is None:
                    yield load_file(str(self.path / name))
                    continue
                with safe_open(str(self.path / name), framework="pt") as handle:
                    present = set(handle.keys())
                    wanted = ["input_ids", "target_mask", "offsets"]
                    for index in states:
                        wanted += [f"state.{index}", f"state.{index}.scale"]
                    yield {key: handle.get_tensor(key) for key in wanted if key in present}
            except Exception as exc:  # safetensors raises its own error types
                raise ArtifactError(f"feature shard {name} is unreadable: {exc}") from exc

    def load(self, states: Sequence[tuple[int, int]] | None = None) -> FeatureData:
        """Examples in memory, states kept in their storage dtype.

        ``states``: the (base index, hidden-state index) pairs to load, default all. A
        carry-on reading a few of the stored taps then holds only those in memory.
        """
        wanted = self.states if states is None else list(dict.fromkeys(states))
        indices = [self.state_index(b, i) for b, i in wanted]
        examples: list[FeatureExample] = []
        for shard in self.iter_shards(None if states is None else indices):
            offsets = shard["offsets"].tolist()
            for row in range(len(offsets) - 1):
                start, end = offsets[row], offsets[row + 1]
                states_of_row = []
                for index in indices:
                    scale = shard.get(f"state.{index}.scale")
                    states_of_row.append(
                        StoredState(
                            shard[f"state.{index}"][start:end],
                            None if scale is None else scale[start:end],
                        )
                    )
                examples.append(
                    FeatureExample(
                        input_ids=shard["input_ids"][start:end].long(),
                        target_mask=shard["target_mask"][start:end].bool(),
                        states=states_of_row,
                    )
                )
        sizes = [self.state_sizes[index] for index in indices]
        return FeatureData(examples, list(wanted), sizes)


@dataclass
class StoredState:
    """One hidden-state tensor (T, D) in its storage dtype, with int8 row scales."""

    values: torch.Tensor
    scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scale is None:
            return self.values.to(dtype)
        return self.values.to(dtype) * self.scale.to(dtype).unsqueeze(-1)


@dataclass
class FeatureExample:
    input_ids: torch.Tensor  # (T,)
    target_mask: torch.Tensor  # (T,) bool: token t is an assistant target
    states: list[StoredState]


@dataclass
class FeatureData:
    examples: list[FeatureExample]
    states: list[tuple[int, int]]
    state_sizes: list[int]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_target_tokens(self) -> int:
        return sum(int(e.target_mask.sum()) for e in self.examples)


def quantize_rows(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization: the paper's low-bit bridge."""
    scale = states.abs().amax(dim=-1).clamp_min(1e-8) / 127.0  # (T,)
    quantized = torch.round(states / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return quantized, scale.to(torch.float32)


def extract_features(
    bases: FrozenBase | Sequence[FrozenBase],
    examples: Sequence[TokenizedExample],
    config: FeatureConfig,
    *,
    cache_dir: str | Path,
    key: str,
    tap_bases: Sequence[int] = (),
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> FeatureSet:
    """Return the feature set for ``key``, running the base(s) only on a cache miss."""
    base_list = [bases] if isinstance(bases, FrozenBase) else list(bases)
    target = Path(cache_dir) / key
    if (target / MANIFEST).is_file():
        cached = FeatureSet.open(target)
        cached.check_base([b.fingerprint().key for b in base_list])
        return cached
    _check_shared_tokenizer(base_list)
    resolved_bases = tuple(tap_bases) or tuple(0 for _ in config.taps)
    taps = [base_list[b].resolve_tap(t) for b, t in zip(resolved_bases, config.taps, strict=True)]
    states = stored_states(
        taps, resolved_bases, base_list[0].num_layers, include_final=config.include_final
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        manifest = _write_shards(base_list, examples, config, states, staging, progress, cancel)
        manifest.update(key=key, base_keys=[b.fingerprint().key for b in base_list])
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), "utf-8")
        if (target / MANIFEST).is_file():  # another worker finished the same key first
            return FeatureSet.open(target)
        if target.exists():
            shutil.rmtree(target)
        replace_durably(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return FeatureSet(target, manifest, extracted=True)


def _check_shared_tokenizer(bases: Sequence[FrozenBase]) -> None:
    hashes = {b.tokenizer.vocab_hash() for b in bases}
    if len(hashes) > 1:
        raise IncompatibleBaseModelError(
            "bases mixed in one carry-on must share one tokenizer: "
            + ", ".join(b.name for b in bases)
            + " do not",
            param="model",
        )


def _write_shards(
    bases: Sequence[FrozenBase],
    examples: Sequence[TokenizedExample],
    config: FeatureConfig,
    states: Sequence[tuple[int, int]],
    folder: Path,
    progress: ProgressFn | None,
    cancel: CancelFn | None,
) -> dict[str, Any]:
    shards: list[str] = []
    total_bytes = 0
    done = 0
    for shard_start in range(0, len(examples), config.shard_examples):
        shard_examples = examples[shard_start : shard_start + config.shard_examples]
        tensors = _extract_shard(bases, shard_examples, config, states, cancel)
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        total_bytes += (folder / name).stat().st_size
        shards.append(name)
        done += len(shard_examples)
        if progress is not None:
            progress(done, len(examples))
    return {
        "format_version": FEATURES_FORMAT_VERSION,
        "config": config.to_dict(),
        "states": [list(s) for s in states],
        "state_sizes": [bases[b].hidden_size for b, _ in states],
        "n_examples": len(examples),
        "n_tokens": sum(len(e.input_ids) for e in examples),
        "n_target_tokens": sum(e.n_targets for e in examples),
        "shards": shards,
        "bytes": total_bytes,
    }


def _extract_shard(
    bases: Sequence[FrozenBase],
    examples: Sequence[TokenizedExample],
    config: FeatureConfig,
    states: Sequence[tuple[int, int]],
    cancel: CancelFn | None,
) -> dict[str, torch.Tensor]:
    per_example: list[list[torch.Tensor]] = [[] for _ in examples]
    # Length-sorted batches waste little compute on padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for batch_start in range(0, len(order), config.batch_size):
        if cancel is not None and cancel():
            raise TrainingCancelled("feature extraction was cancelled")
        batch = order[batch_start : batch_start + config.batch_size]
        hidden = batch_hidden_states(bases, [examples[i] for i in batch], states)
        for row, example_index in enumerate(batch):
            length = len(examples[example_index].input_ids)
            per_example[example_index] = [h[row, :length].to("cpu") for h in hidden]
    tensors: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "target_mask": torch.tensor(
            [m for e in examples for m in e.target_mask], dtype=torch.uint8
        ),
        "offsets": torch.tensor(
            [0, *torch.tensor([len(e.input_ids) for e in examples]).cumsum(0).tolist()],
            dtype=torch.int64,
        ),
    }
    for index in range(len(states)):
        values = torch.cat([rows[index] for rows in per_example]).float()
        if config.storage_dtype == "int8":
            tensors[f"state.{index}"], tensors[f"state.{index}.scale"] = quantize_rows(values)
        else:
            tensors[f"state.{index}"] = values.to(_STORAGE[config.storage_dtype]).contiguous()
    return tensors


def batch_hidden_states(
    bases: Sequence[FrozenBase],
    batch: Sequence[TokenizedExample],
    states: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """Right-padded forward of every base once; causal attention keeps padding harmless."""
    device = bases[0].device
    width = max(len(e.input_ids) for e in batch)
    pad = bases[0].tokenizer.pad_token_id
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention[row, : len(example.input_ids)] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    by_base: dict[int, dict[int, torch.Tensor]] = {}
    ordered: list[torch.Tensor] = []
    for base_index, hidden_index in states:
        if base_index not in by_base:
            wanted = [index for b, index in states if b == base_index]
            computed = bases[base_index].hidden_states(input_ids, attention, wanted)
            by_base[base_index] = dict(zip(wanted, computed, strict=True))
        ordered.append(by_base[base_index][hidden_index])
    return ordered
