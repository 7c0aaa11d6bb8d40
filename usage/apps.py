from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Usage, billing and API keys"

    def ready(self) -> None:
        from agents.models import LLMModel
        from usage import checks, pricing  # noqa: F401 - checks registers the settings check
        from usage.models import ModelPrice

        # A price edited in the admin applies to this process's next call at once.
        for sender in (ModelPrice, LLMModel):
            post_save.connect(pricing.clear_cache, sender=sender, dispatch_uid=f"usage-price-{sender.__name__}-save")
            post_delete.connect(pricing.clear_cache, sender=sender, dispatch_uid=f"usage-price-{sender.__name__}-del")
