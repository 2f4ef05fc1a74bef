"""Register a base model from an HF folder, a GGUF file, an HF hub id, or the bundled one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from webapp.core.exceptions import ApplicationError
from webapp.customizations.management.commands._base_models import (
    register_bundled,
    register_folder,
)
from webapp.customizations.models import BaseModel
from webapp.customizations.services.base_models import _NAME as BASE_MODEL_NAME


class Command(BaseCommand):
    help = (
        "Register (or update) a base model: SOURCE is a local HF folder, a .gguf file, an HF "
        "hub id (where the hub is reachable) or 'bundled'. Loads it once to fingerprint it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source")
        parser.add_argument("--name", help="name used in model ids (default: from the source)")
        parser.add_argument("--revision", default="", help="hub revision (hub ids only)")
        parser.add_argument("--default", action="store_true", help="make it the default base")
        parser.add_argument("--disabled", action="store_true", help="register it disabled")

    def handle(self, *args: Any, **options: Any) -> None:
        from customization.errors import CustomizationError

        source: str = options["source"]
        try:
            if source == "bundled":
                base = register_bundled(default=options["default"])
            else:
                base = self._register(source, options)
        except (ApplicationError, CustomizationError) as exc:
            raise CommandError(exc.message) from exc
        except OSError as exc:
            raise CommandError(str(exc)) from exc
        flags = " (default)" if base.is_default else ""
        self.stdout.write(f"registered {base.name}{flags}: {base.path} [{base.fingerprint_key}]")

    def _register(self, source: str, options: dict[str, Any]) -> BaseModel:
        from customization.base_model import export_hub_base, prepare_gguf_base

        models_dir = settings.MODELS_DIR
        path = Path(source).expanduser()
        if path.suffix == ".gguf" or path.exists() or not _HUB_ID.match(source):
            # A path: it must exist, and is never taken for a hub id when it does not.
            if not path.exists():
                raise CommandError(f"{path} does not exist (hub ids look like 'owner/name')")
            if path.suffix == ".gguf" and path.is_file():
                name = _checked_name(options["name"] or path.stem)
                folder = prepare_gguf_base(path.resolve(), models_dir, name=name)
                kind = BaseModel.SourceType.GGUF
            elif path.is_dir():
                name = _checked_name(options["name"] or path.resolve().name)
                folder, kind = path.resolve(), BaseModel.SourceType.FOLDER
            else:
                raise CommandError(f"{path} is neither an HF folder nor a .gguf file")
        else:
            name = _checked_name(options["name"] or source.split("/")[-1])
            revision = options["revision"] or None
            folder = export_hub_base(source, models_dir, name=name, revision=revision)
            kind = BaseModel.SourceType.HUB
        return register_folder(
            name=name,
            source=source,
            source_type=kind,
            path=folder,
            revision=options["revision"],
            default=options["default"],
            enabled=not options["disabled"],
        )


# What the hub accepts: "name" or "owner/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _checked_name(name: str) -> str:
    """The name is checked before anything is written under the models directory with it."""
    if not BASE_MODEL_NAME.match(name) or ":" in name:
        raise CommandError(
            f"base model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (use --name)"
        )
    return name
