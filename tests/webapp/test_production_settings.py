"""The production settings pass Django's deployment checklist and refuse unsafe set-ups."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")},
        "DJANGO_SETTINGS_MODULE": "webapp.settings.production",
        "CARRY_ON_DATA_DIR": str(tmp_path),
        **env,
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_deploy_passes_at_warning_level(tmp_path: Path) -> None:
    """`manage.py check --deploy --fail-level WARNING` finds nothing on production settings."""
    done = _manage(
        tmp_path,
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(64),
        DJANGO_ALLOWED_HOSTS="studio.example.com",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"DJANGO_ALLOWED_HOSTS": "studio.example.com"}, "DJANGO_SECRET_KEY"),
        (
            {"DJANGO_SECRET_KEY": "short", "DJANGO_ALLOWED_HOSTS": "studio.example.com"},
            "DJANGO_SECRET_KEY",
        ),
        ({"DJANGO_SECRET_KEY": "k" * 64}, "DJANGO_ALLOWED_HOSTS"),
    ],
)
def test_production_refuses_to_start_without_a_secret_or_hosts(
    tmp_path: Path, env: dict[str, str], complaint: str
) -> None:
    """No secret key (or a short one) and no allowed hosts: the process will not start."""
    done = _manage(tmp_path, "check", **env)
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr
    assert complaint in done.stderr
