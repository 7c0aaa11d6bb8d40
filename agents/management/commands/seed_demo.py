"""Idempotent first-run seed: the demo provider, model and agent; a real OpenAI-compatible provider, priced models and
an agent when OPENAI_API_KEY is set; the operator (a superuser); an ordinary demo user with starting credit and the
API key clients use."""

import os
import secrets
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from agents import services as agent_services
from agents.models import Agent, Deployment, LLMModel, Provider
from aiwriter.money import money_str
from usage import pricing
from usage.billing.keys import create_api_key, revoke_api_key
from usage.billing.ledger import ensure_account, grant_credits
from usage.models import ApiKey, CreditAccount

STATE_DIR = Path(settings.STATE_DIR)
# The demo user's starting credit when NEW_USER_CREDIT is 0: enough for a few thousand short replies on a cheap model.
DEMO_STARTING_CREDIT = Decimal("10")
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# name[:input price:output price per million tokens, in CURRENCY], comma-separated.
OPENAI_DEFAULT_MODELS = "gpt-4o-mini:0.15:0.6"
OPENAI_PROVIDER = "openai"
OPENAI_AGENT = "assistant"


def parse_models(spec: str) -> list[tuple[str, Decimal, Decimal]]:
    """`gpt-4o-mini:0.15:0.6,gpt-4o:2.5:10` → [(name, input, output)]; a name alone is priced 0."""
    models = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, *prices = (piece.strip() for piece in item.split(":"))
        if not name or len(prices) not in (0, 2):
            raise CommandError(f"OPENAI_MODELS: {item!r} is not name or name:input_price:output_price.")
        try:
            input_price, output_price = (Decimal(p) for p in prices) if prices else (Decimal("0"), Decimal("0"))
        except InvalidOperation:
            raise CommandError(f"OPENAI_MODELS: the prices in {item!r} are not numbers.") from None
        models.append((name, input_price, output_price))
    if not models:
        raise CommandError("OPENAI_MODELS names no model.")
    return models


class Command(BaseCommand):
    help = ("Seeds the demo provider and agent, a real provider from OPENAI_API_KEY, the operator account, a demo "
            "user with starting credit and its API key (safe to re-run: nothing an operator edited is overwritten).")

    def handle(self, *args, **options):
        self._seed_demo_provider()
        real = self._seed_openai() if os.environ.get("OPENAI_API_KEY") else None
        admin_login, admin_password = self._ensure_user(
            os.environ.get("ADMIN_USER", "admin"), os.environ.get("ADMIN_PASSWORD"), "ADMIN_PASSWORD", superuser=True)
        demo_login, demo_password = self._ensure_user(
            os.environ.get("DEMO_USER", "demo"), os.environ.get("DEMO_PASSWORD"), "DEMO_PASSWORD", superuser=False)
        demo_user = get_user_model().objects.get(username=demo_login)
        self._ensure_demo_credit(demo_user)
        demo_key = self._ensure_demo_key(demo_user)
        balance = CreditAccount.objects.get(user=demo_user).balance
        port = os.environ.get("PORT", "8000")
        base = f"http://127.0.0.1:{port}"
        self.stdout.write(self.style.SUCCESS("aiwriter is seeded."))
        self.stdout.write(f"  Chat:      {base}/")
        self.stdout.write(f"  Admin:     {base}/admin/")
        self.stdout.write(f"  Operator:  {admin_login} / {admin_password}   (superuser: the admin, providers, prices, "
                          "credit; not for clients)")
        self.stdout.write(f"  Demo user: {demo_login} / {demo_password}   (an ordinary account: the chat page)")
        self.stdout.write(f"  API key:   {demo_key}   (the demo user's, for clients: "
                          f"curl -H 'Authorization: Bearer …' {base}/api/me/)")
        self.stdout.write(f"  Credit:    {demo_login} has {money_str(balance)} {settings.CURRENCY}; top up at "
                          f"{base}/admin/usage/creditaccount/ or: python manage.py grant_credit {demo_login} 10")
        self.stdout.write("  Agent:     demo (model demo-chat, built-in demo provider, free)")
        if real is not None:
            provider, names = real
            self.stdout.write(f"  Agent:     {OPENAI_AGENT} (models {', '.join(names)} via {provider.base_url}; "
                              "prices editable in the admin)")

    # --- models and agents ----------------------------------------------------------------------------------------

    def _seed_demo_provider(self) -> None:
        provider, _ = Provider.objects.get_or_create(name="demo", defaults={"kind": Provider.Kind.DEMO})
        model, created = LLMModel.objects.get_or_create(name="demo-chat", defaults={"context_window": 8192})
        Deployment.objects.get_or_create(model=model, provider=provider, upstream_model="demo-chat")
        if created or not model.prices.exists():
            pricing.set_model_price(model, input_per_million=Decimal("0"), output_per_million=Decimal("0"))
        Agent.objects.get_or_create(
            slug="demo",
            defaults={
                "name": "Demo writer",
                "model": model,
                "system_prompt": "You are a helpful writing assistant for {user}. Today is {date}.",
            },
        )

    def _seed_openai(self) -> tuple[Provider, list[str]]:
        """The provider follows the environment (key, base URL) on every run; a model's price is set only when the
        model is new, so an operator's edit in the admin survives the next `make run`."""
        base_url = os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        models = parse_models(os.environ.get("OPENAI_MODELS") or OPENAI_DEFAULT_MODELS)
        provider = Provider.objects.filter(name=OPENAI_PROVIDER).first()
        fields = {"kind": Provider.Kind.OPENAI, "base_url": base_url, "api_key": os.environ["OPENAI_API_KEY"]}
        if provider is None:
            provider = agent_services.create_provider(name=OPENAI_PROVIDER, **fields)
        elif any(getattr(provider, name) != value for name, value in fields.items()):
            provider = agent_services.update_provider(provider, **fields)
        for name, input_price, output_price in models:
            model = LLMModel.objects.filter(name=name).first()
            if model is None:
                with transaction.atomic():
                    model = agent_services.create_model(
                        name=name, deployments=[{"provider": provider, "upstream_model": name}])
                    pricing.set_model_price(model, input_per_million=input_price, output_per_million=output_price)
            else:
                Deployment.objects.get_or_create(model=model, provider=provider, upstream_model=name)
        if not Agent.objects.filter(slug=OPENAI_AGENT).exists():
            Agent.objects.create(slug=OPENAI_AGENT, name="Assistant", model=LLMModel.objects.get(name=models[0][0]),
                                 system_prompt="You are a helpful writing assistant for {user}. Today is {date}.")
        return provider, [name for name, _, _ in models]

    # --- accounts -----------------------------------------------------------------------------------------------------

    def _ensure_user(self, username: str, password: str | None, password_env: str, *,
                     superuser: bool) -> tuple[str, str]:
        password_file = STATE_DIR / password_env.lower()  # admin_password, demo_password
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            password = password or secrets.token_urlsafe(12)
            if superuser:
                get_user_model().objects.create_superuser(username=username, email="", password=password)
            else:
                get_user_model().objects.create_user(username=username, password=password)
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
            password = f"(unchanged; set {password_env} to reset it)"
        return username, password

    def _ensure_demo_credit(self, user) -> None:
        """Once: a new account gets NEW_USER_CREDIT (ensure_account); when that is 0 the demo user still gets
        DEMO_STARTING_CREDIT, so a priced model answers instead of 402 on the first try."""
        if CreditAccount.objects.filter(user=user).exists():
            return
        ensure_account(user)
        if settings.NEW_USER_CREDIT <= 0:
            grant_credits(user=user, amount=DEMO_STARTING_CREDIT, reason="Demo starting credit", created_by=None)

    def _ensure_demo_key(self, user) -> str:
        key_file = STATE_DIR / "demo_api_key"
        if key_file.exists():
            raw = key_file.read_text().strip()
            key = ApiKey.objects.filter(key_hash=ApiKey.hash_key(raw), revoked_at__isnull=True).first()
            if key is not None and key.user_id == user.pk:
                return raw
            if key is not None and key.user.is_superuser:
                # Older seeds printed a superuser's key; it was on screen, so it goes.
                revoke_api_key(api_key=key)
        _, raw = create_api_key(user=user, name="demo")
        STATE_DIR.mkdir(exist_ok=True)
        key_file.write_text(raw)
        key_file.chmod(0o600)
        return raw
