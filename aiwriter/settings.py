"""aiwriter settings: everything is read from the environment here, once.

With no variable set the project runs embedded: SQLite, the local-memory cache,
the in-memory channel layer and the demo provider. `DATABASE_URL` switches to
PostgreSQL, `REDIS_URL` to Redis for the cache, locks and the channel layer.
"""

from __future__ import annotations

import logging
import os
from decimal import Decimal
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "django-insecure-dev-only-key-do-not-use-in-production"

# Salt for the Fernet key that encrypts provider API keys at rest (with SECRET_KEY).
SALT_KEY = env_list("FIELD_ENCRYPTION_SALT", "aiwriter-provider-keys")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

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
    "drf_spectacular",
    "channels",
    "agents",
    "conversations",
    "openai_compat",
    "writer",
    "usage",
    "aiwriter.apps.AiwriterConfig",  # wires metrics signals (aiwriter/observability.py)
]

MIDDLEWARE = [
    "aiwriter.observability.ObservabilityMiddleware",  # outermost: HTTP metrics + Server-Timing
    "aiwriter.middleware.RequestIdMiddleware",
    "aiwriter.middleware.RejectNulMiddleware",  # NUL in a query string: 400, never a database error
    "aiwriter.asyncmw.SecurityMiddleware",
    "aiwriter.middleware.ContentSecurityPolicyMiddleware",  # HTML pages only
    "aiwriter.static.AsyncWhiteNoiseMiddleware",  # async-capable: keeps the chain async (aiwriter/static.py)
    # Django's own, minus a thread hop per step that does no I/O (aiwriter/asyncmw.py; docs/BENCHMARKS.md).
    "aiwriter.asyncmw.SessionMiddleware",
    "aiwriter.asyncmw.CommonMiddleware",
    "aiwriter.asyncmw.CsrfViewMiddleware",
    "aiwriter.asyncmw.AuthenticationMiddleware",
    "aiwriter.asyncmw.MessageMiddleware",
    "aiwriter.asyncmw.XFrameOptionsMiddleware",
]

# These look for Django's middleware by exact path; aiwriter/checks.py checks for them (or subclasses) instead.
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]

ROOT_URLCONF = "aiwriter.urls"
ASGI_APPLICATION = "aiwriter.asgi.application"
WSGI_APPLICATION = None

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

# --- Database -----------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 0))}
    # PostgreSQL: a bounded psycopg pool per process by default, so a burst waits for a connection
    # (DB_POOL_TIMEOUT) instead of opening one per request and hitting max_connections (503s).
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("DB_POOL", True):
        DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps the connections; Django requires 0
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = True  # a connection dead since an outage is replaced
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("DB_POOL_MIN", 2),
            "max_size": env_int("DB_POOL_MAX", 20),
            "timeout": env_float("DB_POOL_TIMEOUT", 30.0),
        }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            "OPTIONS": {"timeout": 20},
        }
    }
IS_POSTGRES = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
# The hot path's statements (credit hold, record + charge, chat turn writes) on an async psycopg pool, one per
# event loop, so no thread hop per step (aiwriter/dbpool.py). PostgreSQL only; SQLite keeps the sync ORM.
DB_ASYNC_POOL = IS_POSTGRES and env_bool("DB_ASYNC_POOL", True)
DB_ASYNC_POOL_MAX = env_int("DB_ASYNC_POOL_MAX", 20)
DB_ASYNC_POOL_TIMEOUT = env_float("DB_ASYNC_POOL_TIMEOUT", 10.0)  # seconds to wait for a free connection
# Where `seed_demo` keeps the generated admin password and demo key between runs.
STATE_DIR = Path(env_str("STATE_DIR", str(BASE_DIR / "var")))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, locks, channel layer ----------------------------------------
REDIS_URL = env_str("REDIS_URL")
REDIS_KEY_PREFIX = env_str("REDIS_KEY_PREFIX", "aiw")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_KEY_PREFIX,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                # The cache is an accelerator: a Redis outage must not fail requests.
                "IGNORE_EXCEPTIONS": True,
                "SOCKET_CONNECT_TIMEOUT": 1,
                "SOCKET_TIMEOUT": 1,
            },
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            # The pub/sub layer delivers a group message in one PUBLISH; the core
            # layer's per-member lists cost tens of ms per group_send (channels_redis #83).
            # (aiwriter.channel_layer: the same, but a websocket still opens while Redis is down.)
            "BACKEND": "aiwriter.channel_layer.ResilientPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_KEY_PREFIX}:ch"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "aiwriter"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Auth ---------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# --- I18N / time --------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
# The calendar month for quotas is counted in this zone.
QUOTA_TIME_ZONE = env_str("QUOTA_TIME_ZONE", "Asia/Shanghai")

# --- Static -------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# --- Security -----------------------------------------------------------------
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# HTML pages load scripts, styles and the websocket from this origin only (static/js, static/css): no inline
# script or style, no CDN. The admin's own templates carry a few inline styles, so its pages allow those.
_CSP_REST = ("img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
             "form-action 'self'; frame-ancestors 'none'")
CONTENT_SECURITY_POLICY = env_str("CONTENT_SECURITY_POLICY",
                                  f"default-src 'self'; script-src 'self'; style-src 'self'; {_CSP_REST}")
CONTENT_SECURITY_POLICY_ADMIN = env_str("CONTENT_SECURITY_POLICY_ADMIN",
                                        f"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                        f"{_CSP_REST}")
if env_bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# How many reverse proxies in front of daphne append to X-Forwarded-For; the client is the Nth entry from the
# right. 0: ignore the header and use the socket's peer (aiwriter/clientaddr.py, docs/deploy.md).
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)
if TRUSTED_PROXY_COUNT < 0:
    raise ImproperlyConfigured("TRUSTED_PROXY_COUNT must be 0 or more.")
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("MAX_REQUEST_BYTES", 1_048_576)

# --- REST framework -------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Bearer first, so an anonymous request gets 401 with WWW-Authenticate, not 403.
        "usage.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "aiwriter.openapi.AutoSchema",  # documents the error answers too
    "EXCEPTION_HANDLER": "aiwriter.errors.api_exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["aiwriter.parsers.JSONParser"],  # refuses NUL characters (400)
    "COERCE_DECIMAL_TO_STRING": True,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "aiwriter API",
    "DESCRIPTION": "AI chat backend and LLM gateway.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

# --- aiwriter -----------------------------------------------------------------
CURRENCY = env_str("CURRENCY", "CNY")
# Money is stored with 10 decimal places: a 1-token call on a cheap model is never zero.
MONEY_DECIMAL_PLACES = 10
DEFAULT_MONTHLY_TOKEN_LIMIT = env_int("DEFAULT_MONTHLY_TOKEN_LIMIT", 0)  # 0 = unlimited
DEFAULT_MONTHLY_COST_LIMIT = Decimal(env_str("DEFAULT_MONTHLY_COST_LIMIT", "0"))  # 0 = unlimited
NEW_USER_CREDIT = Decimal(env_str("NEW_USER_CREDIT", "0"))
ALERT_WEBHOOK_URL = env_str("ALERT_WEBHOOK_URL")
ALERT_WEBHOOK_SECRET = env_str("ALERT_WEBHOOK_SECRET")
ALERT_EMAIL_FROM = env_str("ALERT_EMAIL_FROM", "aiwriter@localhost")
BILLING_SYNC_URL = env_str("BILLING_SYNC_URL")
BILLING_SYNC_TOKEN = env_str("BILLING_SYNC_TOKEN")
# Cut-off streams: "delivered" bills prompt + text delivered; "drain" keeps reading the upstream.
CUTOFF_BILLING_POLICY = env_str("CUTOFF_BILLING_POLICY", "delivered")
CUTOFF_DRAIN_MAX_SECONDS = env_float("CUTOFF_DRAIN_MAX_SECONDS", 10.0)

MAX_CONCURRENT_CONVERSATIONS = env_int("MAX_CONCURRENT_CONVERSATIONS", 3)
# Websocket turns of one process that begin at once; the rest wait in order (conversations/admission.py). 0: no limit.
WS_TURN_STARTS_AT_ONCE = env_int("WS_TURN_STARTS_AT_ONCE", 32)
CONVERSATION_DEDUPE_SECONDS = env_int("CONVERSATION_DEDUPE_SECONDS", 300)
# A generation's lease: its lock, concurrency slot and hold live this long without a heartbeat (the generation
# renews it every 2 s), so a dead generation frees them within seconds. The sweeper runs in every server process.
CONVERSATION_LOCK_SECONDS = env_int("CONVERSATION_LOCK_SECONDS", 15)
SWEEPER_INTERVAL_SECONDS = env_float("SWEEPER_INTERVAL_SECONDS", 5.0)  # 0: no in-process sweeper
# How long a final write (a reply's state, a served call's record) is retried while the database is unreachable.
DEFERRED_WRITE_SECONDS = env_float("DEFERRED_WRITE_SECONDS", 300.0)
MAX_MESSAGE_CHARS = env_int("MAX_MESSAGE_CHARS", 32_000)
# OpenAI-compatible /v1 request limits (the whole body is capped by MAX_REQUEST_BYTES, 413 above it).
OPENAI_MAX_MESSAGES = env_int("OPENAI_MAX_MESSAGES", 256)
OPENAI_MAX_MESSAGE_CHARS = env_int("OPENAI_MAX_MESSAGE_CHARS", 200_000)
MODERATION_BLOCKLIST = env_list("MODERATION_BLOCKLIST", "")
# A callable (text) -> reason | None; the default rejects MODERATION_BLOCKLIST words.
MODERATION_HOOK = env_str("MODERATION_HOOK", "conversations.moderation.blocklist")
MEMORY_TOP_K = env_int("MEMORY_TOP_K", 3)

LLM_CACHE_TTL_SECONDS = env_int("LLM_CACHE_TTL_SECONDS", 3600)
LLM_CACHE_MEMORY_ENTRIES = env_int("LLM_CACHE_MEMORY_ENTRIES", 1024)
# AI service layer (agents/llm): retries, rate-limit waits, health thresholds, route cache.
LLM_RETRY_BASE_DELAY = env_float("LLM_RETRY_BASE_DELAY", 0.25)
LLM_RETRY_MAX_DELAY = env_float("LLM_RETRY_MAX_DELAY", 8.0)
LLM_RATE_LIMIT_MAX_WAIT = env_float("LLM_RATE_LIMIT_MAX_WAIT", 2.0)
LLM_ROUTE_CACHE_SECONDS = env_float("LLM_ROUTE_CACHE_SECONDS", 5.0)
LLM_HEALTH_WINDOW = env_int("LLM_HEALTH_WINDOW", 50)  # last N calls per deployment
LLM_DEGRADED_ERROR_RATE = env_float("LLM_DEGRADED_ERROR_RATE", 0.1)
LLM_UNHEALTHY_ERROR_RATE = env_float("LLM_UNHEALTHY_ERROR_RATE", 0.5)
LLM_SLOW_LATENCY_MS = env_int("LLM_SLOW_LATENCY_MS", 20_000)
LLM_METRICS_RETENTION_MINUTES = env_int("LLM_METRICS_RETENTION_MINUTES", 1440)
DEMO_CHUNK_DELAY_SECONDS = env_float("DEMO_CHUNK_DELAY_SECONDS", 0.03)
METRICS_TOKEN = env_str("METRICS_TOKEN")

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")

# --- Logging ------------------------------------------------------------------
LOG_FORMAT = env_str("LOG_FORMAT", "text")
LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "aiwriter.logging.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "aiwriter.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["request_id"],
            "formatter": "json" if LOG_FORMAT == "json" else "text",
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        # The SDK's HTTP client logs a line per upstream request at INFO: our own call log already says it.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
    },
}
if LOG_FORMAT == "json":
    # Python warnings (a deprecation, a missing static directory) go through logging too: every line stays JSON.
    logging.captureWarnings(True)
