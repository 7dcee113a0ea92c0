"""Settings for batchsite. Every value comes from the environment; `.env.example` lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dj_database_url
from django.core.checks.security.base import (
    SECRET_KEY_INSECURE_PREFIX,
    SECRET_KEY_MIN_LENGTH,
    SECRET_KEY_MIN_UNIQUE_CHARACTERS,
)
from django.core.exceptions import ImproperlyConfigured

from batchsite.env import env_bool, env_float, env_int, env_list, env_str, read_env_file

BASE_DIR = Path(__file__).resolve().parent.parent
# Local settings: `.env` (from `.env.example`, which keeps DJANGO_DEBUG=1); the environment wins.
read_env_file(Path(env_str("DJANGO_ENV_FILE", str(BASE_DIR / ".env"))))

DEVELOPMENT_SECRET_KEY = "django-insecure-development-key-do-not-use-in-production"
# Off unless asked for: a server started without configuration is a production server.
DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY", DEVELOPMENT_SECRET_KEY)


def _weak_secret_key(key: str) -> bool:
    """Django's own rule (check security.W009): short, few distinct characters, or the insecure prefix."""
    return (
        len(key) < SECRET_KEY_MIN_LENGTH
        or len(set(key)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS
        or key.startswith(SECRET_KEY_INSECURE_PREFIX)
    )


if not DEBUG and _weak_secret_key(SECRET_KEY):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG=0 (DEBUG is off unless DJANGO_DEBUG=1): at least "
        f"{SECRET_KEY_MIN_LENGTH} characters, {SECRET_KEY_MIN_UNIQUE_CHARACTERS} distinct, not "
        f"{SECRET_KEY_INSECURE_PREFIX!r}…. For local use: cp .env.example .env (make demo does it)."
    )
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# HTTPS hardening, on by default in production (`manage.py check --deploy` is clean there).
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^health/$"]  # probes inside the cluster speak plain HTTP
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", not DEBUG)
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (and strips it from clients).
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", False) else None
)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "batch",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "batchsite.edge.Utf8RequestsOnly",  # before anything reads the body (415 on bz2, zlib, …)
    "batchsite.edge.NoNulInQuery",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "batchsite.urls"

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

WSGI_APPLICATION = "batchsite.wsgi.application"
ASGI_APPLICATION = "batchsite.asgi.application"


def _database(url: str) -> dict[str, Any]:
    """SQLite gets the options DESIGN.md asks for; PostgreSQL gets psycopg 3's pool."""
    config: dict[str, Any] = dict(dj_database_url.parse(url))
    options: dict[str, Any] = dict(config.get("OPTIONS") or {})
    if config["ENGINE"] == "django.db.backends.sqlite3":
        options.setdefault("transaction_mode", "IMMEDIATE")
        options.setdefault("timeout", 30)
        options.setdefault(
            "init_command",
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;",
        )
        # A file, not memory: tests start real `runbatch` processes against the test database.
        config["TEST"] = {"NAME": env_str("DATABASE_TEST_NAME", "") or str(BASE_DIR / ".test_db.sqlite3")}
    elif config["ENGINE"] == "django.db.backends.postgresql":
        pool_size = env_int("DATABASE_POOL_MAX_SIZE", 4, minimum=0)
        if pool_size:
            options.setdefault("pool", {"min_size": 1, "max_size": pool_size, "timeout": 30})
            config["CONN_MAX_AGE"] = 0
        if env_str("DATABASE_TEST_NAME", ""):
            config["TEST"] = {"NAME": env_str("DATABASE_TEST_NAME", "")}
    config["OPTIONS"] = options
    return config


DATABASES = {"default": _database(env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

REDIS_URL = env_str("REDIS_URL", "")
CHANNEL_LAYERS: dict[str, Any] = (
    {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
    if REDIS_URL
    else {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "batchsite.logformat.KeyValueFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- batch engine -------------------------------------------------------------------------
BATCH_GLOBAL_MAX_PARALLEL = env_int("BATCH_GLOBAL_MAX_PARALLEL", 4, minimum=1)
BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS = env_float("BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS", 30.0, minimum=0)
BATCH_WORKER_CONCURRENCY = env_int("BATCH_WORKER_CONCURRENCY", 16, minimum=1)
BATCH_MAX_ITEMS_PER_BATCH = env_int("BATCH_MAX_ITEMS_PER_BATCH", 100_000, minimum=1)
BATCH_MAX_ATTEMPTS = env_int("BATCH_MAX_ATTEMPTS", 3, minimum=1)
BATCH_LEASE_SECONDS = env_float("BATCH_LEASE_SECONDS", 30.0, minimum=1)
BATCH_HEARTBEAT_SECONDS = env_float("BATCH_HEARTBEAT_SECONDS", 10.0, minimum=0.1)
BATCH_POLL_INTERVAL_SECONDS = env_float("BATCH_POLL_INTERVAL_SECONDS", 0.5, minimum=0.01)
BATCH_ITEM_TIMEOUT_SECONDS = env_float("BATCH_ITEM_TIMEOUT_SECONDS", 0.0, minimum=0)
# One owner's running items across the cluster at most (0: no limit).
BATCH_MAX_RUNNING_PER_OWNER = env_int("BATCH_MAX_RUNNING_PER_OWNER", 0, minimum=0)
# Processes for sync (`def`) handlers per worker (0: the worker's concurrency); they can be killed.
BATCH_SYNC_PROCESSES = env_int("BATCH_SYNC_PROCESSES", 0, minimum=0)
# `runbatch` logs a `worker summary` line this often (0: never).
BATCH_LOG_SUMMARY_SECONDS = env_float("BATCH_LOG_SUMMARY_SECONDS", 60.0, minimum=0)
# Extra modules that register handlers, besides each installed app's `batch_handlers`.
BATCH_HANDLER_MODULES = env_list("BATCH_HANDLER_MODULES", "")
# The built-in `demo.*` handlers (`demo.sleep` lets any user hold workers for an hour): on
# with DJANGO_DEBUG=1, off otherwise.
BATCH_DEMO_HANDLERS = env_bool("BATCH_DEMO_HANDLERS", DEBUG)
# Prometheus metrics (README: Metrics). Off, the engine's hooks do nothing (for an A/B of their cost).
BATCH_METRICS_ENABLED = env_bool("BATCH_METRICS_ENABLED", True)
# `runbatch` serves its own metrics on this port (0: off; `--metrics-port` overrides), bound to this address.
BATCH_METRICS_PORT = env_int("BATCH_METRICS_PORT", 0, minimum=0)
BATCH_METRICS_ADDR = env_str("BATCH_METRICS_ADDR", "0.0.0.0")
# `/metrics` of the web process: staff sessions, and `Authorization: Bearer <this>` when set.
BATCH_METRICS_TOKEN = env_str("BATCH_METRICS_TOKEN", "")
# Completion webhooks (README: Completion webhooks). Hosts a `callback_url` may name, exactly:
# "host" (any port) or "host:port"; empty: every callback_url is refused.
BATCH_CALLBACK_ALLOWED_HOSTS = env_list("BATCH_CALLBACK_ALLOWED_HOSTS", "")
# The key of `X-Batch-Signature: sha256=<hex HMAC-SHA256 of the body>`.
BATCH_CALLBACK_SECRET = env_str("BATCH_CALLBACK_SECRET", "")
# A delivery that keeps failing is retried this long after the batch ended, then marked failed.
BATCH_CALLBACK_RETRY_SECONDS = env_float("BATCH_CALLBACK_RETRY_SECONDS", 3600.0, minimum=0)
# The first retry's delay; it doubles per attempt (with jitter), at most 10 minutes.
BATCH_CALLBACK_BACKOFF_SECONDS = env_float("BATCH_CALLBACK_BACKOFF_SECONDS", 5.0, minimum=0.001)

# --- REST API (batch/api) -------------------------------------------------------------------
# Bodies up to this size are accepted (413 above); 64 MiB fits 100,000 small items.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 64 * 1024 * 1024, minimum=1024)
BATCH_SUBMIT_THROTTLE_RATE = env_str("BATCH_SUBMIT_THROTTLE_RATE", "120/min")
BATCH_CANCEL_THROTTLE_RATE = env_str("BATCH_CANCEL_THROTTLE_RATE", "120/min")
BATCH_RESIZE_THROTTLE_RATE = env_str("BATCH_RESIZE_THROTTLE_RATE", "120/min")
# Dashboard sockets re-check their session and `view_batchjob` this often (and at once on logout).
BATCH_WS_RECHECK_SECONDS = env_float("BATCH_WS_RECHECK_SECONDS", 2.0, minimum=0.05)
# Requests of one user in progress at once, per process (429 beyond; 0: unbounded).
BATCH_MAX_CONCURRENT_SUBMITS_PER_USER = env_int("BATCH_MAX_CONCURRENT_SUBMITS_PER_USER", 2, minimum=0)
BATCH_MAX_WAITING_CANCELS_PER_USER = env_int("BATCH_MAX_WAITING_CANCELS_PER_USER", 4, minimum=0)
BATCH_MAX_CONCURRENT_EXPORTS_PER_USER = env_int("BATCH_MAX_CONCURRENT_EXPORTS_PER_USER", 4, minimum=0)
# Limits of one item's parameters (batch/limits.py; 400 naming the item's index).
BATCH_MAX_ITEM_PARAMS_BYTES = env_int("BATCH_MAX_ITEM_PARAMS_BYTES", 64 * 1024, minimum=2)
BATCH_MAX_ITEM_PARAMS_DEPTH = env_int("BATCH_MAX_ITEM_PARAMS_DEPTH", 20, minimum=1)
# 1: submitting needs the `batch.add_batchjob` permission; 0: any authenticated user may submit.
BATCH_SUBMIT_REQUIRES_PERMISSION = env_bool("BATCH_SUBMIT_REQUIRES_PERMISSION", False)
REST_FRAMEWORK = {
    # Token first: DRF takes WWW-Authenticate from the first class, so anonymous calls get 401.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "batch.api.limits.StrictJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PAGINATION_CLASS": "batch.api.pagination.BatchPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "batch.api.schema.ProblemAutoSchema",
    "EXCEPTION_HANDLER": "batch.api.exceptions.problem_exception_handler",
    "DEFAULT_THROTTLE_RATES": {
        "batch_submit": BATCH_SUBMIT_THROTTLE_RATE,
        "batch_cancel": BATCH_CANCEL_THROTTLE_RATE,
        "batch_resize": BATCH_RESIZE_THROTTLE_RATE,
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Batch API",
    "DESCRIPTION": "Bounded batch execution: submit, inspect, resize and cancel batches. "
    "Errors are RFC 7807 problem details (application/problem+json).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and its docs pages need a token or session like the rest of /api/ (README).
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}
