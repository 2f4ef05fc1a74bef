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
