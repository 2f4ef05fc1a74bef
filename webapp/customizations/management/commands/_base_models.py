"""Shared by the commands that register base models: load once, fingerprint, register.

Loading needs torch; these are operator commands, so the import happens here, lazily.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from webapp.customizations.models import BaseModel
from webapp.customizations.services.base_models import base_model_register


def register_folder(
    *,
    name: str,
    source: str,
    source_type: str,
    path: Path,
    revision: str = "",
    default: bool = False,
    enabled: bool = True,
) -> BaseModel:
    """Fingerprint the prepared HF folder at ``path`` and register it."""
    from customization.base_model import load_base_model

    base = load_base_model(path, name=name, revision=revision or None)
    return base_model_register(
        name=name,
        source=source,
        source_type=source_type,
        path=path,
        revision=revision,
        fingerprint=base.fingerprint().to_dict(),
        enabled=enabled,
        default=default,
    )


def register_bundled(*, default: bool = False) -> BaseModel:
    """Convert (once) and register the bundled SmolLM2-135M-Instruct."""
    from customization.base_model import BUNDLED_NAME, find_bundled_gguf, prepare_bundled_base

    path = prepare_bundled_base(settings.MODELS_DIR)
    return register_folder(
        name=BUNDLED_NAME,
        source=str(find_bundled_gguf()),
        source_type=BaseModel.SourceType.BUNDLED,
        path=path,
        default=default,
    )


def prepare_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into MODELS_DIR/<name> (atomic, like the bundled base)."""
    import os
    import shutil
    import tempfile

    from customization.base_model import convert_gguf_to_hf

    target = Path(settings.MODELS_DIR) / name
    if (target / "tokenizer.json").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf, staging, name=name)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_hub(model_id: str, revision: str, name: str) -> Path:
    """Snapshot an HF hub model into MODELS_DIR/<name>, so every worker loads a folder."""
    import json

    from customization.base_model import load_base_model

    base = load_base_model(model_id, name=name, revision=revision or None)
    target = Path(settings.MODELS_DIR) / name
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
