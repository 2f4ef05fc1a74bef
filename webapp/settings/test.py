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
# Every process of a test session (this one, its live servers and Celery workers) shares
# its metrics through one folder, as the processes of a deployment do (README "Metrics").
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="carry-on-metrics-"))

from webapp.settings.base import *  # noqa: E402, F403
from webapp.settings.base import DATA_DIR, DATABASES, env_bool  # noqa: E402

SECRET_KEY = "test-only-insecure-key"
DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns about a missing one

# Fast tests run the Celery pipeline in-process (tasks are sent on commit and run at once);
# the integration tests start real workers with CELERY_TASK_ALWAYS_EAGER=0.
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so worker subprocesses of the integration tests can share it.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}
