"""register_base_model refuses bad names before writing, and missing paths outright."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "source",
    ["/no/such/folder", "./missing-model", "~/missing", "missing/deeper/path", "gone.gguf"],
)
def test_a_path_that_does_not_exist_is_an_error_not_a_hub_id(source: str) -> None:
    """A missing path (absolute, relative, home, nested or .gguf) never reaches the hub."""
    with pytest.raises(CommandError, match="does not exist"):
        call_command("register_base_model", source)


def test_a_bad_name_is_refused_before_anything_is_written(tmp_path: Path, settings: Any) -> None:
    """An invalid --name for a .gguf source fails before the models directory is touched."""
    settings.MODELS_DIR = tmp_path / "models"
    source = tmp_path / "source"
    source.mkdir()
    gguf = source / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for name in ["../escape", "a:b", "-dash", "x" * 200]:
        with pytest.raises(CommandError, match="base model name"):
            call_command("register_base_model", str(gguf), f"--name={name}")
    assert not (tmp_path / "models").exists()
    assert [p.name for p in source.iterdir()] == ["model.gguf"]
