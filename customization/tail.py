"""The tail: LoRA on the base's own top k decoder layers, run from a cached state.

    hidden_states[L-k] (B, T, D)                       the cached input of layer L-k
      ──> base layers L-k .. L-1, frozen; every target linear adds  s · B A x
      ──> the base's final norm ──> the base's frozen LM head      s = alpha / rank

``B`` starts at zero, so at initialisation the customized model is exactly the base. A tail
is a standard LoRA restricted to the top k layers (PEFT's ``layers_to_transform``), so its
artifact is a PEFT adapter folder that ``PeftModel.from_pretrained`` loads unchanged
(customization/checkpoint.py); with k = L the cached state is the token embeddings and the
tail *is* LoRA on every layer.

A training node builds a tail with ``load_tail``: it reads only the top k layers, the final
norm and the LM head from the base's safetensors, never the layers below the tail (why:
docs/architecture.md, "The tail").
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from customization import packed
from customization.config import TailConfig
from customization.errors import BaseModelNotFoundError


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank delta: ``W x + s · B (A x)``."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's default: A as nn.Linear initialises itself, B zero (the delta starts at 0).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM adds the delta into the base's output in place: ``s`` scales the small
        ``B`` (out, r), never the (tokens, out) delta, so no full-size multiply or add runs
        forward or backward (PEFT's ``base(x) + B(A x) * s`` pays both; on SmolLM2 they
        were ~9 % of a tail's training step)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        low = F.linear(self.dropout(flat), self.lora_A.weight)  # (N, r)
        out = F.linear(flat, self.base.weight, self.base.bias)  # (N, out)
        out = out.addmm_(low, (self.lora_B.weight * self.scaling).t())
        return out.view(*x.shape[:-1], out.shape[-1])


def _target_modules(layer: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """``(dotted name within the layer, linear)`` for every target, in a stable order."""
    found = [
        (name, module)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    missing = set(targets) - {name.rsplit(".", 1)[-1] for name, _ in found}
    if missing:
        raise ValueError(f"target_modules: this base's layers have no {sorted(missing)[0]!r}")
    return found


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class TailModel(nn.Module):
    """The base's top ``depth`` layers with LoRA, its final norm and rotary embedding.

    ``layers[j]`` is base layer ``config.first_layer + j``. Only the LoRA matrices require
    gradients; everything else is the frozen base.
    """

    def __init__(
        self,
        config: TailConfig,
        layers: nn.ModuleList,
        norm: nn.Module,
        rotary: nn.Module,
        *,
        decoder_prefix: str = "model",
    ):
        super().__init__()
        if not config.num_layers:
            raise ValueError("TailModel needs a resolved config: call config.resolved(...)")
        if len(layers) != config.depth:
            raise ValueError(f"a depth-{config.depth} tail got {len(layers)} layers")
        self.config = config
        self.layers = layers
        self.norm = norm
        self.rotary = rotary
        self.decoder_prefix = decoder_prefix
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        for layer in self.layers:
            for name, linear in _target_modules(layer, config.target_modules):
                lora = LoraLinear(linear, config.rank, config.scaling, config.dropout)
                _set_submodule(layer, name, lora)
        # Rows packed without their padding need attention per row (packed.Sequences);
        # a base whose attention is not SDPA keeps the padded path.
        attentions: list[Any] = [getattr(layer, "self_attn", None) for layer in self.layers]
        self.packs = all(a is not None and packed.install_on_config(a.config) for a in attentions)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def lora_modules(self) -> list[tuple[int, str, LoraLinear]]:
        """``(base layer index, dotted name within the layer, module)`` of every LoRA."""
        found = []
        for offset, layer in enumerate(self.layers):
            for name, module in layer.named_modules():
                if isinstance(module, LoraLinear):
                    found.append((self.config.first_layer + offset, name, module))
        return found

    def num_parameters(self) -> int:
        """Trainable (LoRA) parameters only: the artifact's size."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def peft_key(self, layer: int, name: str, matrix: str) -> str:
        """The key PEFT saves this LoRA matrix under (``matrix`` is "lora_A" or "lora_B")."""
        return f"base_model.model.{self.decoder_prefix}.layers.{layer}.{name}.{matrix}.weight"

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights under PEFT's names (what the artifact stores)."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, name, module in self.lora_modules():
            tensors[self.peft_key(layer, name, "lora_A")] = module.lora_A.weight
            tensors[self.peft_key(layer, name, "lora_B")] = module.lora_B.weight
        return tensors

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Assign stored LoRA weights (PEFT names); refuses a set that does not fit."""
        expected = self.lora_state_dict()
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors)) or sorted(set(tensors) - set(expected))
            raise ValueError(f"the LoRA weights do not fit this tail: {missing[0]}")
        with torch.no_grad():
            for key, target in expected.items():
                value = tensors[key]
                if value.shape != target.shape:
                    raise ValueError(f"the LoRA weight {key} has shape {tuple(value.shape)}")
                target.copy_(value.to(target.dtype))

    def forward(
        self, states: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Right-padded cached states (B, T, D) -> the final normed state (B, T, D).

        With ``lengths`` (B,) the layers run on the real tokens only, packed into one
        sequence (``packed.Sequences``), and the result is put back in its padded place
        (zeros at the pads). Without, the padded rows run as they are: no padding mask is
        needed, since with right padding and causal attention no real token attends to a
        pad, so SDPA's own causal flag is exact.
        """
        hidden = states.to(self.dtype)
        extra: dict[str, Any] = {}
        real = None
        if lengths is not None and self.packs:
            real = positions < lengths[:, None].to(positions.device)  # (B, T)
            hidden, positions = hidden[real][None], positions[real][None]  # (1, N, D), (1, N)
            extra["packed"] = packed.Sequences(lengths.tolist())
        position_embeddings = self.rotary(hidden, positions)  # cos, sin (B, T, hd)
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=positions,
                position_embeddings=position_embeddings,
                **extra,
            )
            hidden = out[0] if isinstance(out, tuple) else out  # (B, T, D) or (1, N, D)
        normed: torch.Tensor = self.norm(hidden)
        if real is None:
            return normed
        return normed.new_zeros((*real.shape, normed.shape[-1])).index_put((real,), normed[0])


# -- building a tail from the base's files, reading only what it runs --------------------------


@dataclass
class TailParts:
    """What a training node holds for a tail: the top layers, norm, rotary, LM head."""

    hf_config: Any
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    head_weight: torch.Tensor  # (V, D)
    decoder_prefix: str
    loaded_keys: list[str]  # the base tensors read from disk (tests check what was read)


def _tensor_files(base_dir: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor of an HF folder."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        return {key: base_dir / name for key, name in weight_map.items()}
    single = base_dir / "model.safetensors"
    if not single.is_file():
        raise BaseModelNotFoundError(f"{base_dir} holds no safetensors weights", param="model")
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _read(files: dict[str, Path], wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """``wanted``: stored key -> new key. Each file is opened once."""
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(files[key], []).append(key)
    tensors = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                tensors[wanted[key]] = handle.get_tensor(key)
    return tensors


def load_tail_parts(
    base_dir: str | Path, depth: int, *, head_only: bool = False, device: str = "cpu"
) -> TailParts:
    """Read the top ``depth`` layers, the final norm and the LM head of an HF folder.

    The layers are built on the meta device from the base's own config (any HF decoder
    architecture with ``<prefix>.layers.<i>``), then the stored weights are assigned; the
    layers below the tail are never read. ``head_only`` reads just the LM head (a carry-on's
    training node) and returns no layers.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(base_dir)
    hf_config = AutoConfig.from_pretrained(folder)
    num_layers = int(hf_config.num_hidden_layers)
    if not 1 <= depth <= num_layers:
        raise ValueError(f"depth must be in [1, {num_layers}] for this base, got {depth}")
    first = num_layers - depth
    sub = copy.deepcopy(hf_config)
    sub.num_hidden_layers = depth
    if getattr(sub, "layer_types", None):
        sub.layer_types = list(sub.layer_types)[first:]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(sub, dtype=torch.float32)
    prefix = skeleton.base_model_prefix  # "model" for Llama, Qwen, Mistral, ...
    decoder = skeleton.get_decoder()
    files = _tensor_files(folder)
    head_key = "lm_head.weight" if "lm_head.weight" in files else f"{prefix}.embed_tokens.weight"
    wanted = {head_key: "head"}
    if not head_only:
        wanted[f"{prefix}.norm.weight"] = "norm.weight"
        for key in files:
            parts = key.split(".")
            if key.startswith(f"{prefix}.layers.") and int(parts[2]) >= first:
                wanted[key] = ".".join([str(int(parts[2]) - first), *parts[3:]])
    tensors = _read(files, wanted)
    head = tensors.pop("head").to(device)
    layers: nn.ModuleList = decoder.layers
    norm: nn.Module = decoder.norm
    if not head_only:
        norm.load_state_dict({"weight": tensors.pop("norm.weight")}, assign=True)
        layers.load_state_dict(tensors, assign=True)
    # The rotary tables are non-persistent buffers: build them for real, not on meta.
    rotary = type(decoder.rotary_emb)(config=sub)
    return TailParts(
        hf_config=hf_config,
        layers=layers.to(device) if not head_only else nn.ModuleList(),
        norm=norm.to(device) if not head_only else norm,
        rotary=rotary.to(device),
        head_weight=head,
        decoder_prefix=prefix,
        loaded_keys=sorted(wanted),
    )


def build_tail(config: TailConfig, parts: TailParts, *, seed: int) -> TailModel:
    """A freshly initialised tail over ``parts``; deterministic for ``seed``."""
    num_layers = int(parts.hf_config.num_hidden_layers)
    resolved = config.resolved(num_layers=num_layers)
    if len(parts.layers) != resolved.depth:
        raise ValueError(f"parts hold {len(parts.layers)} layers; the tail needs {config.depth}")
    torch.manual_seed(seed)
    return TailModel(
        resolved, parts.layers, parts.norm, parts.rotary, decoder_prefix=parts.decoder_prefix
    )


def load_tail(
    base_dir: str | Path, config: TailConfig, *, seed: int, device: str = "cpu"
) -> tuple[TailModel, torch.Tensor]:
    """A fresh tail and the frozen LM head weight, read from the base's folder."""
    parts = load_tail_parts(base_dir, config.depth, device=device)
    return build_tail(config, parts, seed=seed), parts.head_weight


# -- a tail for serving: only its LoRA matrices ----------------------------------------------


@dataclass
class TailAdapter:
    """A loaded tail artifact for the serving engine: ``(A (r, in), B (out, r))`` per
    ``(base layer index, dotted module name)``; the base's own layers do the rest."""

    config: TailConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.weights.values()
        )

    @classmethod
    def from_peft_tensors(cls, config: TailConfig, tensors: dict[str, torch.Tensor]) -> TailAdapter:
        """Parse PEFT's ``base_model.model.<prefix>.layers.<i>.<name>.lora_<A|B>.weight``."""
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            head, _, rest = key.partition(".layers.")
            index, _, tail_key = rest.partition(".")
            name, _, matrix = tail_key.removesuffix(".weight").rpartition(".")
            if not head.startswith("base_model.model") or matrix not in ("lora_A", "lora_B"):
                raise ValueError(f"not a LoRA weight of a decoder layer: {key}")
            pairs.setdefault((int(index), name), {})[matrix] = value
        weights = {}
        for where, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"layer {where[0]} {where[1]} lacks lora_A or lora_B")
            weights[where] = (pair["lora_A"], pair["lora_B"])
        outside = sorted({layer for layer, _ in weights} - set(config.layers))
        if outside:
            raise ValueError(f"LoRA weights for layer {outside[0]}, outside the tail's layers")
        return cls(config, weights)


def tail_parts_from_model(model: Any, depth: int) -> TailParts:
    """The same parts copied from a base already loaded in this process (CLI, tests).

    The layers are deep copies, so adding LoRA to them never touches the loaded base.
    """
    decoder = model.get_decoder()
    num_layers = len(decoder.layers)
    if not 1 <= depth <= num_layers:
        raise ValueError(f"depth must be in [1, {num_layers}] for this base, got {depth}")
    layers = nn.ModuleList(
        copy.deepcopy(decoder.layers[i]) for i in range(num_layers - depth, num_layers)
    )
    for layer in layers:  # a base that serves tails has wrapped linears: take the plain ones
        for name, module in list(layer.named_modules()):
            if getattr(module, "wraps_linear", False):
                _set_submodule(layer, name, module.base)
    return TailParts(
        hf_config=model.config,
        layers=layers,
        norm=copy.deepcopy(decoder.norm),
        rotary=decoder.rotary_emb,
        head_weight=model.get_output_embeddings().weight.detach(),
        decoder_prefix=model.base_model_prefix,
        loaded_keys=[],
    )
