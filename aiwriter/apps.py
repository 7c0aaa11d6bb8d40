from django.apps import AppConfig


class AiwriterConfig(AppConfig):
    """The project package as an app, so it can wire cross-app signals (metrics) in ready()."""

    name = "aiwriter"
    verbose_name = "aiwriter"

    def ready(self) -> None:
        from aiwriter import checks, observability  # noqa: F401 - checks registers itself

        observability.connect()
