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
