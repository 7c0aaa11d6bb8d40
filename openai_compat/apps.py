from django.apps import AppConfig


class OpenaiCompatConfig(AppConfig):
    """The OpenAI-compatible gateway (`/v1`): an entry point, at the top of the layers (docs/contributing.md)."""

    name = "openai_compat"
    verbose_name = "OpenAI-compatible API (/v1)"

    def ready(self) -> None:
        from openai_compat import hotcache

        hotcache.connect()  # saving a key, user, model or agent clears this process's lookups
