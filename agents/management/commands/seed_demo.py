"""Idempotent first-run seed: demo provider, model, agent, an admin and a demo API key."""

import os
import secrets
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.utils import timezone

from agents.models import Agent, Deployment, LLMModel, Provider
from usage.models import ApiKey, ModelPrice
from usage.services import create_api_key

STATE_DIR = Path(settings.STATE_DIR)


class Command(BaseCommand):
    help = "Seeds the demo provider, model and agent, an admin account and a demo API key (safe to re-run)."

    def handle(self, *args, **options):
        provider, _ = Provider.objects.get_or_create(name="demo", defaults={"kind": Provider.Kind.DEMO})
        model, created = LLMModel.objects.get_or_create(name="demo-chat", defaults={"context_window": 8192})
        Deployment.objects.get_or_create(model=model, provider=provider, upstream_model="demo-chat")
        if created or not model.prices.exists():
            ModelPrice.objects.create(model=model, input_per_million=Decimal("0"), output_per_million=Decimal("0"),
                                      effective_from=timezone.now())
        Agent.objects.get_or_create(
            slug="demo",
            defaults={
                "name": "Demo writer",
                "model": model,
                "system_prompt": "You are a helpful writing assistant for {user}. Today is {date}.",
            },
        )
        admin_login, admin_password = self._ensure_admin()
        demo_key = self._ensure_demo_key(admin_login)
        port = os.environ.get("PORT", "8000")
        self.stdout.write(self.style.SUCCESS("aiwriter is seeded."))
        self.stdout.write(f"  Chat:      http://127.0.0.1:{port}/")
        self.stdout.write(f"  Admin:     http://127.0.0.1:{port}/admin/")
        self.stdout.write(f"  Login:     {admin_login} / {admin_password}")
        self.stdout.write(f"  API key:   {demo_key}")
        self.stdout.write("  Agent:     demo (model demo-chat, built-in demo provider)")

    def _ensure_admin(self) -> tuple[str, str]:
        username = os.environ.get("ADMIN_USER", "admin")
        password_file = STATE_DIR / "admin_password"
        user = get_user_model().objects.filter(username=username).first()
        password = os.environ.get("ADMIN_PASSWORD")
        if user is None:
            password = password or secrets.token_urlsafe(12)
            user = get_user_model().objects.create_superuser(username=username, email="", password=password)
        elif password:
            user.set_password(password)
            user.save(update_fields=["password"])
        if password:
            STATE_DIR.mkdir(exist_ok=True)
            password_file.write_text(password)
            password_file.chmod(0o600)
        elif password_file.exists():
            password = password_file.read_text().strip()
        else:
            password = "(unchanged; set ADMIN_PASSWORD to reset it)"
        return username, password

    def _ensure_demo_key(self, username: str) -> str:
        key_file = STATE_DIR / "demo_api_key"
        if key_file.exists():
            raw = key_file.read_text().strip()
            if ApiKey.objects.filter(key_hash=ApiKey.hash_key(raw), revoked_at__isnull=True).exists():
                return raw
        user = get_user_model().objects.get(username=username)
        _, raw = create_api_key(user=user, name="demo")
        STATE_DIR.mkdir(exist_ok=True)
        key_file.write_text(raw)
        key_file.chmod(0o600)
        return raw
