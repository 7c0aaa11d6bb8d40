from django.apps import AppConfig


class AiwriterConfig(AppConfig):
    """The project package as an app, so it can wire cross-app signals (metrics) in ready()."""

    name = "aiwriter"
    verbose_name = "aiwriter"

    def ready(self) -> None:
        from agents.selectors import deployment_health
        from aiwriter import checks, observability  # noqa: F401 - checks registers itself
        from usage.models import UsageRecord

        # aiwriter's wiring sits above every app; observability (the base layer) gets the app parts from here.
        observability.connect(UsageRecord, deployment_health)
        # Our product's name in the operator console, not "Django administration".
        from django.contrib import admin

        admin.site.site_header = "aiwriter · operator console"
        admin.site.site_title = "aiwriter admin"
        admin.site.index_title = "Providers, models, agents, users and billing"
