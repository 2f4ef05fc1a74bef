"""Saving and loading carry-on artifacts (never pickled).

An artifact is a folder holding ``carry_on.safetensors`` (the weights) and
``carry_on_config.json`` (format version, the carry-on config, the fingerprint of every base
it reads). Loading checks the fingerprint against the base at hand and refuses a mismatch
with ``IncompatibleBaseModelError``; given the expected sha256 it also refuses a corrupted
or swapped artifact with ``ArtifactError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from customization.base_model import BaseFingerprint
from customization.carry_on import CarryOn
from customization.config import CarryOnConfig
from customization.errors import ArtifactError

WEIGHTS_FILE = "carry_on.safetensors"
CONFIG_FILE = "carry_on_config.json"
ARTIFACT_FORMAT_VERSION = 1

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ArtifactInfo:
    path: Path
    sha256: str
    nbytes: int
    num_parameters: int


def artifact_sha256(path: str | Path) -> str:
    """sha256 over the weights and the config file: any change to either changes it."""
    folder = Path(path)
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
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
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tensors = {
            name: value.detach().to("cpu", _DTYPES[dtype]).contiguous()
            for name, value in carry_on.state_dict().items()
        }
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        document = {
            "format_version": ARTIFACT_FORMAT_VERSION,
            "carry_on": carry_on.config.to_dict(),
            "bases": [fp.to_dict() for fp in base_fingerprints],
            "dtype": dtype,
            "num_parameters": carry_on.num_parameters(),
            "created_at": datetime.now(UTC).isoformat(),
            "metadata": metadata or {},
        }
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2), "utf-8")
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ArtifactInfo(
        path=target,
        sha256=artifact_sha256(target),
        nbytes=sum(f.stat().st_size for f in target.iterdir() if f.is_file()),
        num_parameters=carry_on.num_parameters(),
    )


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing target is swapped out, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def read_artifact_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / CONFIG_FILE
    try:
        document: dict[str, Any] = json.loads(config_file.read_text("utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"carry-on artifact {Path(path)} has no {CONFIG_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{config_file} is not valid JSON: {exc}") from exc
    version = document.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{config_file} has unsupported format_version {version!r}")
    return document


def load_carry_on(
    path: str | Path,
    *,
    base_fingerprints: Sequence[BaseFingerprint] | None = None,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> CarryOn:
    """Load an artifact, refusing a mismatched base or a corrupted file."""
    folder = Path(path)
    if expected_sha256 is not None and artifact_sha256(folder) != expected_sha256:
        raise ArtifactError(
            f"carry-on artifact {folder.name} does not match its recorded sha256 "
            "(corrupted or replaced on disk); refusing to load it"
        )
    document = read_artifact_config(folder)
    stored = [BaseFingerprint.from_dict(fp) for fp in document.get("bases", [])]
    if base_fingerprints is not None:
        if len(stored) != len(base_fingerprints):
            raise ArtifactError(
                f"carry-on reads {len(stored)} base(s); {len(base_fingerprints)} were given"
            )
        for mine, theirs in zip(base_fingerprints, stored, strict=True):
            mine.check_compatible(theirs)
    config = CarryOnConfig.from_dict(document["carry_on"])
    # Built on the meta device: no memory is allocated or randomly initialised only to be
    # overwritten by the stored weights (the cold load is then mostly the file read).
    with torch.device("meta"):
        carry_on = CarryOn(config)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(torch.device(device)))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"carry-on weights in {folder} are unreadable: {exc}") from exc
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
