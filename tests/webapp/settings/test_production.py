"""The production settings pass Django's deployment checklist and refuse unsafe set-ups."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


# Shared services, as production wants them (nothing here connects to them).
SERVICES = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    "CARRY_ON_CACHE_URL": "redis://127.0.0.1:6379/1",
}
SECRETS = {
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
    "DJANGO_ALLOWED_HOSTS": "studio.example.com",
}
_OURS = ("DJANGO_", "DATABASE_URL", "CELERY_", "CARRY_ON_")


def _python(
    tmp_path: Path, *argv: str, settings: str | None = "webapp.settings.production", **env: str
) -> subprocess.CompletedProcess[str]:
    """``python *argv`` in the repository, with none of our variables but ``env`` (and the
    settings module unless None), and its data folder under ``tmp_path``."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(_OURS)},
        "CARRY_ON_DATA_DIR": str(tmp_path),
        **({"DJANGO_SETTINGS_MODULE": settings} if settings else {}),
        **env,
    }
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _manage(
    tmp_path: Path, *args: str, settings: str | None = "webapp.settings.production", **env: str
) -> subprocess.CompletedProcess[str]:
    """``manage.py *args``, on the production settings unless ``settings`` says otherwise."""
    return _python(tmp_path, "manage.py", *args, settings=settings, **env)


def test_check_deploy_passes_at_warning_level(tmp_path: Path) -> None:
    """`manage.py check --deploy --fail-level WARNING` finds nothing on production settings."""
    done = _manage(
        tmp_path,
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        **SECRETS,
        **SERVICES,
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
    done = _manage(tmp_path, "check", **SERVICES, **env)
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr
    assert complaint in done.stderr


@pytest.mark.parametrize(
    ("missing", "override", "complaint"),
    [
        ("DATABASE_URL", "CARRY_ON_ALLOW_SQLITE", "SQLite"),
        ("CELERY_BROKER_URL", "CARRY_ON_ALLOW_FILESYSTEM_BROKER", "filesystem"),
        ("CARRY_ON_CACHE_URL", "CARRY_ON_ALLOW_LOCAL_CACHE", "per process"),
    ],
)
def test_production_refuses_embedded_services_unless_overridden(
    tmp_path: Path, missing: str, override: str, complaint: str
) -> None:
    """SQLite, the filesystem broker or a per-process cache stop production, unless allowed."""
    services = {k: v for k, v in SERVICES.items() if k != missing}
    refused = _manage(tmp_path, "check", **SECRETS, **services)
    assert refused.returncode != 0
    assert "ImproperlyConfigured" in refused.stderr
    assert complaint in refused.stderr
    assert override in refused.stderr
    allowed = _manage(tmp_path, "check", **SECRETS, **services, **{override: "1"})
    assert allowed.returncode == 0, allowed.stderr


def test_production_trusts_no_proxy_hop_by_default(tmp_path: Path) -> None:
    """CARRY_ON_TRUSTED_PROXIES defaults to 0: X-Forwarded-For is ignored unless configured."""
    done = _manage(
        tmp_path,
        "shell",
        "-c",
        "from django.conf import settings; print(settings.CARRY_ON['TRUSTED_PROXIES'])",
        **SECRETS,
        **SERVICES,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0"


def test_manage_without_settings_refuses_a_non_development_command(tmp_path: Path) -> None:
    """With no DJANGO_SETTINGS_MODULE, only development commands run on the local settings."""
    refused = _manage(tmp_path, "collectstatic", "--no-input", settings=None)
    assert refused.returncode != 0
    assert "DJANGO_SETTINGS_MODULE" in refused.stderr
    local = _manage(tmp_path, "check", settings=None)
    assert local.returncode == 0, local.stderr


def test_celery_app_without_settings_uses_the_production_ones(tmp_path: Path) -> None:
    """The Celery app never falls back to the local settings (DEBUG, a published key)."""
    importing = "import workers.celery_app, django.conf as c; c.settings.DEBUG"
    done = _python(tmp_path, "-c", importing, settings=None)
    assert done.returncode != 0
    assert "DJANGO_SECRET_KEY" in done.stderr
