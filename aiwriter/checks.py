"""Django's deploy checks security.W001–W003 look for its middleware by exact dotted path; ours are subclasses
(aiwriter.asyncmw), so settings silence those three and this check stands in for them, by class."""

from __future__ import annotations

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

REQUIRED = {
    "security.W001": "django.middleware.security.SecurityMiddleware",
    "security.W002": "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "security.W003": "django.middleware.csrf.CsrfViewMiddleware",
}


@checks.register(checks.Tags.security, deploy=True)
def security_middleware(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    installed = [import_string(name) for name in settings.MIDDLEWARE]
    problems = []
    for django_id, dotted in REQUIRED.items():
        required = import_string(dotted)
        if not any(isinstance(cls, type) and issubclass(cls, required) for cls in installed):
            problems.append(checks.Warning(f"{dotted} (or a subclass) is not in MIDDLEWARE; it stands for "
                                           f"Django's {django_id}, silenced in settings.", id="aiwriter.W001"))
    return problems


@checks.register(checks.Tags.database, deploy=True)
def embedded_mode(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """`check --deploy` with DEBUG off: the embedded parts (no DATABASE_URL / REDIS_URL) hold their rules in one
    process only — locks, limits, dedupe and websocket fan-out are not shared, and SQLite takes one writer."""
    if settings.DEBUG:
        return []
    problems = []
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        problems.append(checks.Warning(
            "The database is SQLite (DATABASE_URL is unset): it serves one process only and no money or limit "
            "rule holds across processes.", hint="Set DATABASE_URL=postgres://… (docs/deploy.md).",
            id="aiwriter.W002"))
    if any(layer.get("BACKEND") == "channels.layers.InMemoryChannelLayer"
           for layer in settings.CHANNEL_LAYERS.values()):
        problems.append(checks.Warning(
            "The channel layer is in memory (REDIS_URL is unset): websocket replies, cancels and other tabs reach "
            "only sockets on the same process, and locks and rate limits are per process.",
            hint="Set REDIS_URL=redis://… (docs/deploy.md).", id="aiwriter.W003"))
    return problems
