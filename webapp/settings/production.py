"""Production: secrets and hosts from the environment, HTTPS behind a proxy, no DEBUG.

Passes ``manage.py check --deploy --fail-level WARNING`` when DJANGO_SECRET_KEY is a real
secret. Use PostgreSQL (DATABASE_URL), Redis or RabbitMQ (CELERY_BROKER_URL) and shared
storage for CARRY_ON_DATA_DIR; see the README's production section.
"""

import os

from django.core.exceptions import ImproperlyConfigured

from webapp.settings.base import *  # noqa: F403
from webapp.settings.base import (
    CACHES,
    CELERY_BROKER_URL,
    DATABASES,
    SECRET_KEY,
    env_bool,
    env_list,
)

DEBUG = False
if len(SECRET_KEY) < 50:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set to a random string of 50+ characters")
# No default: the public host name(s) must be given, e.g. "studio.example.com".
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS")
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must list the host names the site serves")

# TLS terminates at the proxy, which sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", 31536000))
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SECURE = True
X_FRAME_OPTIONS = "DENY"
# Behind a proxy that appends the client's address to X-Forwarded-For, set
# CARRY_ON_TRUSTED_PROXIES to the number of such hops (base.py; default 0: REMOTE_ADDR), or
# every client could name its own address and escape the per-address log-in limits.

# The embedded defaults are for one machine and one process: refuse them here unless the
# operator says, in so many words, that this is what they want.
_EMBEDDED = [
    (
        DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3",
        "CARRY_ON_ALLOW_SQLITE",
        "the database is SQLite; set DATABASE_URL=postgres://...",
    ),
    (
        CELERY_BROKER_URL.startswith("filesystem://"),
        "CARRY_ON_ALLOW_FILESYSTEM_BROKER",
        "the Celery broker is the filesystem; set CELERY_BROKER_URL=redis://... or amqp://...",
    ),
    (
        CACHES["default"]["BACKEND"].endswith("LocMemCache"),
        "CARRY_ON_ALLOW_LOCAL_CACHE",
        "the cache is per process (rate limits, quotas and log-in lockouts would not be "
        "shared); set CARRY_ON_CACHE_URL=redis://...",
    ),
]
for _embedded, _override, _why in _EMBEDDED:
    if _embedded and not env_bool(_override, False):
        raise ImproperlyConfigured(f"{_why} (or set {_override}=1 to run so anyway)")
# Health checks from the load balancer come over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
