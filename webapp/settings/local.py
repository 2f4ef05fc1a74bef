"""Local development and the one-command embedded run (``make run``)."""

from webapp.settings.base import *  # noqa: F403
from webapp.settings.base import SECRET_KEY, env_bool

DEBUG = env_bool("DJANGO_DEBUG", True)
SECRET_KEY = SECRET_KEY or "local-only-insecure-key-do-not-use-in-production"
