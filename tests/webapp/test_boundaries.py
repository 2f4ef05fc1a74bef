"""The web process stays light: serving pages, the admin and validation never load torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import django
django.setup()
import webapp.urls, webapp.customizations.admin, webapp.accounts.authentication
import workers.tasks
from webapp.customizations.services import files, jobs, claims, planning, results, artifacts
from customization.datasets import parse_dataset
parse_dataset(b'{"prompt": "a", "completion": "b"}')
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_web_process_never_imports_torch() -> None:
    """Importing every web module and the task module (as the web process does) loads no torch."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings.test"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
