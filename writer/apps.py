from django.apps import AppConfig


class WriterConfig(AppConfig):
    """The writer endpoints (`/api/ai/...`): an entry point, at the top of the layers (docs/contributing.md)."""

    name = "writer"
    verbose_name = "Writer endpoints (/api/ai)"
