"""Saving and loading adapter artifacts (never pickled): carry-ons and tails.

A carry-on artifact is a folder holding ``carry_on.safetensors`` (the weights) and
``carry_on_config.json`` (format version, the carry-on config, the fingerprint of every base
it reads). A tail artifact is a standard PEFT LoRA folder, ``adapter_config.json`` (with
``layers_to_transform``) and ``adapter_model.safetensors``, that ``PeftModel.from_pretrained``
loads as it is, plus our own ``carry_on_tail.json`` beside it (format version, the tail
config, the base fingerprint). Loading checks the fingerprint against the base at hand and
refuses a mismatch with ``IncompatibleBaseModelError``; given the expected sha256 it also
refuses a corrupted or swapped artifact with ``ArtifactError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from customization.base_model import BaseFingerprint
from customization.carry_on import CarryOn
from customization.config import CarryOnConfig, TailConfig
from customization.durable import atomic_dir
from customization.errors import ArtifactError
from customization.tail import TailAdapter, TailModel

WEIGHTS_FILE = "carry_on.safetensors"
CONFIG_FILE = "carry_on_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
TAIL_FILE = "carry_on_tail.json"
TAIL_FILES = (PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE, TAIL_FILE)
# A training checkpoint is an artifact folder plus the trainer state (safetensors + JSON).
TRAINER_STATE = "trainer_state"
ARTIFACT_FORMAT_VERSION = 1

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ArtifactInfo:
    path: Path
    sha256: str
    nbytes: int
    num_parameters: int


def is_tail_artifact(path: str | Path) -> bool:
    return (Path(path) / TAIL_FILE).is_file()


def artifact_sha256(path: str | Path) -> str:
    """sha256 over the weights and the config files: any change to either changes it."""
    folder = Path(path)
    digest = hashlib.sha256()
    for name in TAIL_FILES if is_tail_artifact(folder) else (WEIGHTS_FILE, CONFIG_FILE):
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"carry-on artifact {folder} has no {name}")
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def save_carry_on(
    carry_on: CarryOn,
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint],
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
) -> ArtifactInfo:
    """Write the artifact atomically: a temp sibling folder renamed into place."""
    tensors = _stored(carry_on.state_dict(), dtype)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        document = {
            "format_version": ARTIFACT_FORMAT_VERSION,
            "carry_on": carry_on.config.to_dict(),
            "bases": [fp.to_dict() for fp in base_fingerprints],
            "dtype": dtype,
            "num_parameters": carry_on.num_parameters(),
            "created_at": datetime.now(UTC).isoformat(),
            "metadata": metadata or {},
        }
        (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2), "utf-8")

    return _write_artifact(Path(path), write, carry_on.num_parameters())


def save_tail(
    tail: TailModel,
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint],
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
) -> ArtifactInfo:
    """Write a tail as a standard PEFT LoRA folder plus our metadata, atomically."""
    tensors = _stored(tail.lora_state_dict(), dtype)
    config = tail.config
    (fingerprint,) = base_fingerprints  # a tail extends exactly one base
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": fingerprint.name,
        "revision": fingerprint.revision or None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "layers_to_transform": list(config.layers),
        "layers_pattern": "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2), "utf-8")
        document = {
            "format_version": ARTIFACT_FORMAT_VERSION,
            "kind": "tail",
            "tail": config.to_dict(),
            "bases": [fingerprint.to_dict()],
            "dtype": dtype,
            "num_parameters": tail.num_parameters(),
            "created_at": datetime.now(UTC).isoformat(),
            "metadata": metadata or {},
        }
        (folder / TAIL_FILE).write_text(json.dumps(document, indent=2), "utf-8")

    return _write_artifact(Path(path), write, tail.num_parameters())


def save_adapter(
    model: CarryOn | TailModel,
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint],
    metadata: dict[str, Any] | None = None,
) -> ArtifactInfo:
    """Save either kind in its own format."""
    if isinstance(model, TailModel):
        return save_tail(model, path, base_fingerprints=base_fingerprints, metadata=metadata)
    return save_carry_on(model, path, base_fingerprints=base_fingerprints, metadata=metadata)


def _stored(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return {k: v.detach().to("cpu", _DTYPES[dtype]).contiguous() for k, v in state.items()}


def _write_artifact(
    target: Path, write: Callable[[Path], None], num_parameters: int
) -> ArtifactInfo:
    """Run ``write`` into a staging folder that then becomes ``target`` (``atomic_dir``)."""
    with atomic_dir(target) as staging:
        write(staging)
    return ArtifactInfo(
        path=target,
        sha256=artifact_sha256(target),
        nbytes=sum(f.stat().st_size for f in target.iterdir() if f.is_file()),
        num_parameters=num_parameters,
    )


def read_artifact_config(path: str | Path) -> dict[str, Any]:
    return _read_document(Path(path), CONFIG_FILE, "carry-on")


def _read_document(folder: Path, name: str, kind: str) -> dict[str, Any]:
    """An artifact's JSON metadata, checked for a format version this code can read."""
    return _parse_document(folder / name, _read_file(folder, name, kind))


def _read_file(folder: Path, name: str, kind: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{kind} artifact {folder} has no {name}") from None
    except OSError as exc:
        raise ArtifactError(f"{kind} artifact file {folder / name} is unreadable: {exc}") from exc


def _parse_document(file: Path, data: bytes) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from exc
    version = document.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{file} has unsupported format_version {version!r}")
    return document


@dataclass(frozen=True)
class _Layout:
    """The files of one artifact kind: ``hashed`` in the order ``artifact_sha256`` takes them."""

    kind: str
    document: str  # our JSON, holding the base fingerprints
    weights: str
    hashed: tuple[str, ...]


_CARRY_ON_LAYOUT = _Layout("carry-on", CONFIG_FILE, WEIGHTS_FILE, (WEIGHTS_FILE, CONFIG_FILE))
_TAIL_LAYOUT = _Layout("tail", TAIL_FILE, PEFT_WEIGHTS_FILE, TAIL_FILES)


def _read_verified(
    folder: Path,
    layout: _Layout,
    check_bases: Callable[[list[BaseFingerprint]], None],
    expected_sha256: str | None,
    device: str | torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An artifact's document and weights, each file read once.

    The small JSON files come first, so a mismatched base is refused before the weights
    are read; the sha256 is taken over the very bytes that are then parsed, so a file
    replaced between a check and a read cannot slip through.
    """
    contents = {n: _read_file(folder, n, layout.kind) for n in layout.hashed if n != layout.weights}
    try:
        document = _parse_document(folder / layout.document, contents[layout.document])
        stored = [BaseFingerprint.from_dict(fp) for fp in document.get("bases", [])]
    except Exception:
        if expected_sha256 is not None:  # a damaged file is reported as damaged
            contents[layout.weights] = _read_file(folder, layout.weights, layout.kind)
            _check_sha256(folder, layout, contents, expected_sha256)
        raise
    check_bases(stored)
    contents[layout.weights] = _read_file(folder, layout.weights, layout.kind)
    if expected_sha256 is not None:
        _check_sha256(folder, layout, contents, expected_sha256)
    try:
        tensors = safetensors_load(contents.pop(layout.weights))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{layout.kind} weights in {folder} are unreadable: {exc}") from exc
    return document, {k: v.to(device) for k, v in tensors.items()}


def _check_sha256(folder: Path, layout: _Layout, contents: dict[str, bytes], expected: str) -> None:
    digest = hashlib.sha256()
    for name in layout.hashed:
        digest.update(contents[name])
        digest.update(b"\0")
    if digest.hexdigest() != expected:
        raise ArtifactError(
            f"{layout.kind} artifact {folder.name} does not match its recorded sha256 "
            "(corrupted or replaced on disk); refusing to load it"
        )


def load_carry_on(
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint] | None = None,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> CarryOn:
    """Load an artifact, refusing a mismatched base or a corrupted file."""
    folder = Path(path)

    def check_bases(stored: list[BaseFingerprint]) -> None:
        if base_fingerprints is None:
            return
        if len(stored) != len(base_fingerprints):
            raise ArtifactError(
                f"carry-on reads {len(stored)} base(s); {len(base_fingerprints)} were given"
            )
        for mine, theirs in zip(base_fingerprints, stored, strict=True):
            mine.check_compatible(theirs)

    document, tensors = _read_verified(
        folder, _CARRY_ON_LAYOUT, check_bases, expected_sha256, device
    )
    config = CarryOnConfig.from_dict(document["carry_on"])
    # Built on the meta device: no memory is allocated or randomly initialised only to be
    # overwritten by the stored weights (the cold load is then mostly the file read).
    with torch.device("meta"):
        carry_on = CarryOn(config, initialize=False)
    expected = carry_on.state_dict()
    if set(tensors) != set(expected):
        raise ArtifactError(f"carry-on weights in {folder} do not match its config")
    mismatched = [k for k, v in tensors.items() if v.shape != expected[k].shape]
    if mismatched:
        raise ArtifactError(
            f"carry-on weights in {folder} do not match its config: {mismatched[0]}"
        )
    carry_on.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, assign=True)
    carry_on.materialize_buffers(device)
    return carry_on.eval()


# -- tails ------------------------------------------------------------------------------------


def read_tail_artifact(path: str | Path) -> dict[str, Any]:
    """Our metadata of a tail artifact (``carry_on_tail.json``)."""
    return _read_document(Path(path), TAIL_FILE, "tail")


def _checked_tail(
    folder: Path,
    base_fingerprints: Sequence[BaseFingerprint] | None,
    expected_sha256: str | None,
    device: str | torch.device,
) -> tuple[TailConfig, dict[str, torch.Tensor]]:
    """A tail's config and LoRA tensors, read and checked as a carry-on's are."""

    def check_bases(stored: list[BaseFingerprint]) -> None:
        if base_fingerprints is None:
            return
        if len(stored) != 1 or len(base_fingerprints) != 1:
            raise ArtifactError("a tail extends exactly one base")
        base_fingerprints[0].check_compatible(stored[0], what="this tail")

    document, tensors = _read_verified(folder, _TAIL_LAYOUT, check_bases, expected_sha256, device)
    return TailConfig.from_dict(document["tail"]), tensors


def load_tail_adapter(
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint] | None = None,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> TailAdapter:
    """A tail's LoRA matrices for the serving engine, checked like a carry-on."""
    folder = Path(path)
    config, tensors = _checked_tail(folder, base_fingerprints, expected_sha256, device)
    try:
        return TailAdapter.from_peft_tensors(config, tensors)
    except ValueError as exc:
        raise ArtifactError(f"tail weights in {folder} do not match its config: {exc}") from exc


def load_tail_weights(tail: TailModel, path: str | Path) -> None:
    """Put a saved tail's LoRA weights into ``tail`` (resuming from a checkpoint)."""
    folder = Path(path)
    config, tensors = _checked_tail(folder, None, None, tail.device)
    if config.layers != tail.config.layers or config.rank != tail.config.rank:
        raise ArtifactError(f"the tail in {folder} has another shape than the one training")
    try:
        tail.load_lora_state_dict(tensors)
    except ValueError as exc:
        raise ArtifactError(f"tail weights in {folder} do not fit: {exc}") from exc


def load_initial_weights(
    path: str | Path,
    *,
    config: CarryOnConfig | TailConfig,
    base_fingerprints: Sequence[BaseFingerprint],
    expected_sha256: str,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A saved adapter's weights to continue fine-tuning from (``train_adapter``'s
    ``initial_weights``), under the names the artifact stores them by.

    Checked as a load for serving is (the recorded sha256, then the base fingerprint), and
    the artifact must be of the kind and shape being trained (``config``): weights of
    another shape would not load, and of another tap layout would silently mean something
    else.
    """
    folder = Path(path)
    stored: CarryOnConfig | TailConfig
    if is_tail_artifact(folder):
        stored, tensors = _checked_tail(folder, base_fingerprints, expected_sha256, device)
    else:
        carry_on = load_carry_on(
            folder,
            base_fingerprints=base_fingerprints,
            expected_sha256=expected_sha256,
            device=device,
        )
        stored, tensors = carry_on.config, dict(carry_on.state_dict())
    different = _shape_difference(stored, config)
    if different is not None:
        raise ArtifactError(
            f"the adapter in {folder.name} has another {different} than the one training; "
            "a continued fine-tune keeps its parent's kind and shape"
        )
    return tensors


def _shape_difference(
    stored: CarryOnConfig | TailConfig, wanted: CarryOnConfig | TailConfig
) -> str | None:
    """The first shape field in which two adapter configs differ ("kind" across kinds).

    Sizes filled from the base when the adapter was built (a carry-on's ``tap_sizes`` and
    ``hidden_size``, a tail's ``num_layers``) count only where both configs know them;
    ``gate_bias_init`` only shapes a fresh initialisation, which the weights replace.
    """
    if type(stored) is not type(wanted):
        return "kind"
    for name, mine in wanted.to_dict().items():
        theirs = getattr(stored, name)
        filled = name in ("tap_sizes", "hidden_size", "num_layers")
        if name in ("format_version", "gate_bias_init") or (filled and not (mine and theirs)):
            continue
        if (list(theirs) if isinstance(theirs, tuple) else theirs) != mine:
            return name
    return None


def load_adapter(
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint] | None = None,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> CarryOn | TailAdapter:
    """Load either kind of artifact for serving (the folder says which)."""
    load = load_tail_adapter if is_tail_artifact(path) else load_carry_on
    return load(
        path,
        base_fingerprints=base_fingerprints,
        expected_sha256=expected_sha256,
        device=device,
    )


# -- the trainer's checkpoint folders: <folder>/step-<8 digits>/ ----------------------------


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``checkpoint_dir``."""
    return checkpoint_dir / f"step-{step:08d}"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete and intact checkpoint under ``folder``, or None.

    A checkpoint a crash left half-written is removed; so is one whose files no longer
    match the checksums written with it (damaged storage): resuming falls back to the
    one before it instead of failing the job, or resuming from garbage.
    """
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("step-*"), reverse=True):
        if _intact(path):
            return path
        logger.warning("skipping the incomplete or damaged checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def latest_checkpoint_step(folder: Path) -> int | None:
    """Step of the checkpoint training will resume from: the newest complete, intact one."""
    latest = latest_checkpoint(folder)
    return int(latest.name.split("-")[1]) if latest is not None else None


def _intact(path: Path) -> bool:
    try:
        scalars = json.loads((path / f"{TRAINER_STATE}.json").read_text("utf-8"))
        if "state_sha256" not in scalars:  # written before checksums: trust a readable one
            load_file(str(path / f"{TRAINER_STATE}.safetensors"))
            return True
        return bool(
            scalars["state_sha256"] == file_sha256(path / f"{TRAINER_STATE}.safetensors")
            and scalars["artifact_sha256"] == artifact_sha256(path)
        )
    except (OSError, ValueError, KeyError, ArtifactError, SafetensorError):
        return False


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
