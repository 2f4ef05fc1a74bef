"""Settings shared by every environment, driven by environment variables.

Defaults are the embedded ones: SQLite and a filesystem Celery broker under the data
directory, so one command runs the whole product with no external services.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Where datasets, feature caches, artifacts and the embedded database/broker live.
DATA_DIR = Path(os.environ.get("CARRY_ON_DATA_DIR", BASE_DIR / "data")).resolve()
# Prepared base models (large, shared); the bundled SmolLM2 is converted here once.
MODELS_DIR = Path(os.environ.get("CARRY_ON_MODELS_DIR", DATA_DIR / "base_models")).resolve()

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "webapp.core",
    "webapp.accounts",
    "webapp.customizations",
    "webapp.evaluations",
    "webapp.serving",
    "webapp.usage",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "webapp.core.middleware.NullCharacterMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # after the session is known (nothing before it reads the body), before any view
    "webapp.core.middleware.BodySizeLimitMiddleware",
    "webapp.core.middleware.UserRateLimitMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"
ASGI_APPLICATION = "webapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web and worker processes share the file: wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    # refuses every log-in attempt while its (username, address) is locked out
    "webapp.accounts.throttling.LoginThrottleBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", BASE_DIR / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# Uploads: bodies above this are refused with 413 before they are read.
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("CARRY_ON_MAX_REQUEST_BYTES", 2 * 1024 * 1024))
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
CARRY_ON_MAX_UPLOAD_BYTES = int(os.environ.get("CARRY_ON_MAX_UPLOAD_BYTES", 64 * 1024 * 1024))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}

# -- Celery ---------------------------------------------------------------------------------
# The embedded default is kombu's filesystem transport under DATA_DIR; set
# CELERY_BROKER_URL to redis://... or amqp://... in production.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = Path(os.environ.get("CARRY_ON_BROKER_DIR", DATA_DIR / "broker")).resolve()
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
elif CELERY_BROKER_URL.startswith("redis"):
    # Longer than any task may run, so a slow task is never delivered twice; a killed
    # worker's job is recovered sooner by the heartbeat sweep (workers/runtime.py).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 4 * 3600}
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_TIME_LIMIT = int(os.environ.get("CARRY_ON_TASK_TIME_LIMIT", 6 * 3600))
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 60
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Sending a task gives up after about a second when the broker is unreachable: job creation
# then answers 503 and creates nothing (services/jobs.py), instead of hanging the request.
CELERY_BROKER_CONNECTION_TIMEOUT = float(os.environ.get("CARRY_ON_BROKER_CONNECT_TIMEOUT", "2"))
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
# Queues: default (validation, bookkeeping), embed (inference nodes holding the base),
# train (training nodes). A worker picks its queues with -Q.
CELERY_TASK_ROUTES = {
    "workers.tasks.extract_job_features": {"queue": "embed"},
    "workers.tasks.train_job": {"queue": "train"},
    "workers.tasks.run_evaluation": {"queue": "embed"},
}

# -- The carry-on platform ------------------------------------------------------------------
CARRY_ON = {
    # torch threads per worker/serving process; 0 = torch's default
    "TORCH_THREADS": int(os.environ.get("CARRY_ON_TORCH_THREADS", "0")),
    # "cpu", "cuda", "cuda:1", ...; "auto" picks CUDA when available
    "DEVICE": os.environ.get("CARRY_ON_DEVICE", "auto"),
    # seconds without a heartbeat after which a running job counts as orphaned
    "HEARTBEAT_TIMEOUT": int(os.environ.get("CARRY_ON_HEARTBEAT_TIMEOUT", "120")),
    # how often a running task refreshes its heartbeat and checks for cancellation
    "HEARTBEAT_INTERVAL": float(os.environ.get("CARRY_ON_HEARTBEAT_INTERVAL", "5")),
    # a stage whose worker dies this many times fails instead of being resumed again
    "MAX_ATTEMPTS": int(os.environ.get("CARRY_ON_MAX_ATTEMPTS", "3")),
    # seconds after which a queued job that no worker has taken is sent to the broker again
    # (its message was lost: broker down when a stage was enqueued, or a crash right before)
    "REQUEUE_AFTER": int(os.environ.get("CARRY_ON_REQUEUE_AFTER", "900")),
    # sends of a job that no worker takes before it fails with no_worker_available
    "MAX_REQUEUES": int(os.environ.get("CARRY_ON_MAX_REQUEUES", "4")),
    # the largest carry-on a job may ask for (parameters), so no request can exhaust a worker;
    # 32 M float32 parameters are 128 MB, a quarter of the default serving adapter cache
    "MAX_CARRY_ON_PARAMETERS": int(
        os.environ.get("CARRY_ON_MAX_CARRY_ON_PARAMETERS", str(32 * 1024 * 1024))
    ),
    # the longest example (in tokens of the job's base) an upload or a job accepts
    "MAX_EXAMPLE_TOKENS": int(os.environ.get("CARRY_ON_MAX_EXAMPLE_TOKENS", "4096")),
    # the largest carry_on.max_length a job may ask for (tokens)
    "MAX_LENGTH_CAP": int(os.environ.get("CARRY_ON_MAX_LENGTH_CAP", "4096")),
    # checkpoints kept per job (the newest ones; older ones are deleted as training goes)
    "KEEP_CHECKPOINTS": int(os.environ.get("CARRY_ON_KEEP_CHECKPOINTS", "3")),
    # API requests per minute per key (429 with retry-after beyond it)
    "RATE_LIMIT_PER_MINUTE": int(os.environ.get("CARRY_ON_RATE_LIMIT_PER_MINUTE", "600")),
    # Requests per minute per user, whatever key or session they come with (429 beyond):
    # every /v1 call, and the costly actions, on the API and the pages alike (webapp/core/
    # ratelimits.py maps each route to its scope).
    "USER_RATE_LIMITS": {
        "requests": int(os.environ.get("CARRY_ON_USER_REQUESTS_PER_MINUTE", "1200")),
        "chat": int(os.environ.get("CARRY_ON_USER_CHATS_PER_MINUTE", "120")),
        "uploads": int(os.environ.get("CARRY_ON_USER_UPLOADS_PER_MINUTE", "30")),
        "jobs": int(os.environ.get("CARRY_ON_USER_JOBS_PER_MINUTE", "20")),
        "live": int(os.environ.get("CARRY_ON_USER_LIVE_PER_MINUTE", "300")),
        "evaluations": int(os.environ.get("CARRY_ON_USER_EVALUATIONS_PER_MINUTE", "10")),
    },
    # Per-user quotas (a 4xx naming the quota beyond them)
    "MAX_API_KEYS_PER_USER": int(os.environ.get("CARRY_ON_MAX_API_KEYS_PER_USER", "20")),
    "MAX_ACTIVE_JOBS_PER_USER": int(os.environ.get("CARRY_ON_MAX_ACTIVE_JOBS_PER_USER", "16")),
    "MAX_STORED_BYTES_PER_USER": int(
        os.environ.get("CARRY_ON_MAX_STORED_BYTES_PER_USER", str(2 * 1024**3))
    ),
    # Evaluations (webapp/evaluations): unfinished ones per user, and the most an evaluation
    # may ask for: models, examples scored for loss, problems decoded, new tokens per answer
    "MAX_ACTIVE_EVALUATIONS_PER_USER": int(
        os.environ.get("CARRY_ON_MAX_ACTIVE_EVALUATIONS_PER_USER", "4")
    ),
    "EVALUATION_MAX_MODELS": int(os.environ.get("CARRY_ON_EVALUATION_MAX_MODELS", "8")),
    "EVALUATION_MAX_EXAMPLES": int(os.environ.get("CARRY_ON_EVALUATION_MAX_EXAMPLES", "1000")),
    "EVALUATION_MAX_PROBLEMS": int(os.environ.get("CARRY_ON_EVALUATION_MAX_PROBLEMS", "64")),
    "EVALUATION_MAX_TOKENS": int(os.environ.get("CARRY_ON_EVALUATION_MAX_TOKENS", "512")),
    # browser log-in: this many failures for one username from one address (or 10x as many
    # from one address for any usernames, or LOGIN_MAX_FAILURES_PER_USERNAME for one username
    # from anywhere) lock further attempts out for LOGIN_LOCKOUT_SECONDS
    "LOGIN_MAX_FAILURES": int(os.environ.get("CARRY_ON_LOGIN_MAX_FAILURES", "5")),
    "LOGIN_MAX_FAILURES_PER_USERNAME": int(
        os.environ.get("CARRY_ON_LOGIN_MAX_FAILURES_PER_USERNAME", "50")
    ),
    "LOGIN_LOCKOUT_SECONDS": int(os.environ.get("CARRY_ON_LOGIN_LOCKOUT_SECONDS", "900")),
    # self-service sign-up attempts (form posts) per client address per hour (429 beyond)
    "SIGNUPS_PER_HOUR": int(os.environ.get("CARRY_ON_SIGNUPS_PER_HOUR", "10")),
    # reverse proxies in front of the service that append to X-Forwarded-For (0: none, the
    # client address is REMOTE_ADDR); only these trusted hops are skipped
    "TRUSTED_PROXIES": int(os.environ.get("CARRY_ON_TRUSTED_PROXIES", "0")),
    # the serving engine of each web process
    "SERVING_MAX_BATCH": int(os.environ.get("CARRY_ON_SERVING_MAX_BATCH", "8")),
    # Sequences (choices) waiting or decoding; past it a chat gets 429. Keep it below the web
    # server's threads per process (README: --threads 24), so the 429 comes before the
    # threads run out and pages still answer while chats queue.
    "SERVING_MAX_PENDING": int(os.environ.get("CARRY_ON_SERVING_MAX_PENDING", "16")),
    # of which one user may hold at most this many (per web process)
    "SERVING_MAX_PER_USER": int(os.environ.get("CARRY_ON_SERVING_MAX_PER_USER", "8")),
    # a prompt longer than this many tokens is prefilled one chunk per decode step, so a long
    # prompt joining never stalls the running requests for its whole length
    "SERVING_PREFILL_CHUNK": int(os.environ.get("CARRY_ON_SERVING_PREFILL_CHUNK", "256")),
    "SERVING_ADAPTER_CACHE_BYTES": int(
        os.environ.get("CARRY_ON_SERVING_ADAPTER_CACHE_BYTES", str(512 * 1024 * 1024))
    ),
    "SERVING_DEFAULT_MAX_TOKENS": int(os.environ.get("CARRY_ON_SERVING_DEFAULT_MAX_TOKENS", "512")),
    # register the bundled SmolLM2 as the default base when no base exists
    "BUNDLED_BASE": env_bool("CARRY_ON_BUNDLED_BASE", True),
}

# -- The browser pages ------------------------------------------------------------------------
# Self-service sign-up at /accounts/signup/; off by default (the operator creates accounts).
CARRY_ON["SIGNUP_ENABLED"] = env_bool("CARRY_ON_SIGNUP_ENABLED", False)

# -- Usage records and metrics (README "Usage" and "Metrics") ---------------------------------
# Usage records wait in each web process's buffer and are written in one insert by a
# background thread every USAGE_FLUSH_SECONDS, or sooner once USAGE_BATCH_SIZE wait; at
# most USAGE_MAX_BUFFERED wait while the database is unreachable (then the oldest go).
CARRY_ON["USAGE_FLUSH_SECONDS"] = float(os.environ.get("CARRY_ON_USAGE_FLUSH_SECONDS", "2"))
CARRY_ON["USAGE_BATCH_SIZE"] = int(os.environ.get("CARRY_ON_USAGE_BATCH_SIZE", "200"))
CARRY_ON["USAGE_MAX_BUFFERED"] = int(os.environ.get("CARRY_ON_USAGE_MAX_BUFFERED", "100000"))
# /metrics answers staff sessions and "Authorization: Bearer <this token>" (unset: staff only).
# Several processes (gunicorn workers, Celery workers) share their figures through
# PROMETHEUS_MULTIPROC_DIR, an empty per-host folder set in the environment of all of them.
CARRY_ON["METRICS_TOKEN"] = os.environ.get("CARRY_ON_METRICS_TOKEN", "")
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus_client writes there at import
    Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
# how often a web process copies its serving engine's state into the gauges
CARRY_ON["METRICS_SAMPLE_SECONDS"] = float(os.environ.get("CARRY_ON_METRICS_SAMPLE_SECONDS", "1"))

# -- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "webapp.core.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
# Rate-limit counters: per process by default; point CARRY_ON_CACHE_URL at Redis so that
# several web processes share them.
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["CARRY_ON_CACHE_URL"],
        }
        if os.environ.get("CARRY_ON_CACHE_URL")
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Carry-On Studio API",
    "DESCRIPTION": "OpenAI-compatible fine-tuning and chat completions with carry-ons.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/v1",
    "SERVERS": [{"url": "/"}],
    "COMPONENT_SPLIT_REQUEST": True,
    "APPEND_COMPONENTS": {"securitySchemes": {"ApiKey": {"type": "http", "scheme": "bearer"}}},
    "SECURITY": [{"ApiKey": []}],
    "AUTHENTICATION_WHITELIST": [],
}
