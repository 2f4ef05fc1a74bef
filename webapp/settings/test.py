"""Settings for the test suite. DATABASE_URL (e.g. PostgreSQL in CI) still applies.

Each test session gets its own data directory (unless CARRY_ON_DATA_DIR is set), while the
prepared base model is shared from the repository's ``data/base_models`` (``make test``
prepares it once).
"""

import os
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("CARRY_ON_DATA_DIR", tempfile.mkdtemp(prefix="carry-on-test-"))
os.environ.setdefault("CARRY_ON_MODELS_DIR", str(_REPO / "data" / "base_models"))
os.environ.setdefault("CARRY_ON_TORCH_THREADS", "2")

from webapp.settings.base import *  # noqa: E402, F403

SECRET_KEY = "test-only-insecure-key"
DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
