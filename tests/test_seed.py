"""`manage.py seed_demo` (run by `make run`): idempotent, the operator separate from the demo user whose key is
printed, starting credit once, and a real provider from OPENAI_API_KEY whose prices the operator may edit."""

import re
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import override_settings

from agents.models import Agent, Deployment, LLMModel, Provider
from agents.selectors import current_price
from usage.models import ApiKey, CreditAccount, LedgerEntry
from usage.pricing import set_model_price

pytestmark = pytest.mark.django_db


@pytest.fixture
def seed(tmp_path, monkeypatch, capsys):
    from agents.management.commands import seed_demo

    monkeypatch.setattr(seed_demo, "STATE_DIR", tmp_path)
    for name in ("ADMIN_PASSWORD", "DEMO_PASSWORD", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODELS"):
        monkeypatch.delenv(name, raising=False)

    def run() -> str:
        call_command("seed_demo")
        return capsys.readouterr().out

    return run


def test_seed_is_idempotent_and_keeps_password(seed, tmp_path):
    first = seed()
    second = seed()
    assert Provider.objects.filter(kind="demo").count() == 1
    assert LLMModel.objects.filter(name="demo-chat").count() == 1
    assert Agent.objects.filter(slug="demo").count() == 1
    assert ApiKey.objects.count() == 1
    assert first == second  # same logins and the same demo key
    password = (tmp_path / "admin_password").read_text()
    assert get_user_model().objects.get(username="admin").check_password(password)


def test_seed_sets_password_from_environment(seed, monkeypatch):
    monkeypatch.setenv("ADMIN_PASSWORD", "s3cret-pass")
    seed()
    assert get_user_model().objects.get(username="admin").check_password("s3cret-pass")


def test_printed_key_is_an_ordinary_users_and_the_operator_login_is_named(seed):
    out = seed()
    raw = re.search(r"API key:\s+(\S+)", out)[1]
    key = ApiKey.objects.get(key_hash=ApiKey.hash_key(raw))
    assert key.user.username == "demo" and not key.user.is_staff and not key.user.is_superuser
    operator = re.search(r"Operator:\s+(\S+) / (\S+)\s+\(superuser", out)
    assert operator and get_user_model().objects.get(username=operator[1]).is_superuser
    demo = re.search(r"Demo user:\s+(\S+) / (\S+)", out)
    assert get_user_model().objects.get(username="demo").check_password(demo[2])
    assert "grant_credit demo" in out and "/admin/usage/creditaccount/" in out


def test_an_older_seeds_superuser_key_is_replaced_and_revoked(seed, tmp_path):
    from usage.billing.keys import create_api_key

    admin = get_user_model().objects.create_superuser("admin", "", "pw")
    old, raw = create_api_key(user=admin, name="demo")
    (tmp_path / "demo_api_key").write_text(raw)
    out = seed()
    assert raw not in out
    old.refresh_from_db()
    assert old.revoked_at is not None


def test_demo_user_gets_starting_credit_once(seed):
    seed()
    seed()
    account = CreditAccount.objects.get(user__username="demo")
    assert account.balance == Decimal("10")
    assert LedgerEntry.objects.filter(account=account, kind="topup").count() == 1


@override_settings(NEW_USER_CREDIT=Decimal("3.5"))
def test_demo_starting_credit_is_new_user_credit_when_set(seed):
    seed()
    assert CreditAccount.objects.get(user__username="demo").balance == Decimal("3.5")


def test_grant_credit_command_tops_up(seed, capsys):
    seed()
    call_command("grant_credit", "demo", "2.25", "--reason", "test")
    assert "balance 12.25" in capsys.readouterr().out
    assert CreditAccount.objects.get(user__username="demo").balance == Decimal("12.25")


def test_openai_environment_seeds_provider_priced_models_and_agent_idempotently(seed, monkeypatch, fake_upstream):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-1")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_upstream.base_url)
    monkeypatch.setenv("OPENAI_MODELS", "fake-mini:0.15:0.6, fake-big:2.5:10")
    out = seed()
    provider = Provider.objects.get(name="openai")
    assert provider.kind == "openai" and provider.base_url == fake_upstream.base_url and provider.api_key == "sk-test-1"
    mini = LLMModel.objects.get(name="fake-mini")
    assert current_price(mini).input_per_million == Decimal("0.15")
    assert current_price(mini).output_per_million == Decimal("0.6")
    assert current_price(LLMModel.objects.get(name="fake-big")).output_per_million == Decimal("10")
    assert Deployment.objects.filter(provider=provider).count() == 2
    assert Agent.objects.get(slug="assistant").model == mini
    assert "assistant" in out

    set_model_price(mini, input_per_million=Decimal("0.15"), output_per_million=Decimal("0.7"))  # an admin edit
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-2")  # and rotates the key
    seed()
    provider.refresh_from_db()
    assert provider.api_key == "sk-test-2"
    assert current_price(mini).output_per_million == Decimal("0.7")  # the edit survives the re-run
    assert Provider.objects.filter(name="openai").count() == 1 and Agent.objects.filter(slug="assistant").count() == 1
    assert Deployment.objects.filter(provider=provider).count() == 2


def test_the_seeded_agent_answers_through_the_fake_upstream_and_is_charged(seed, monkeypatch, fake_upstream,
                                                                             api_client):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_upstream.base_url)
    monkeypatch.setenv("OPENAI_MODELS", "fake-mini:1:2")
    raw = re.search(r"API key:\s+(\S+)", seed())[1]
    response = api_client.post("/v1/chat/completions", {"model": "agent:assistant", "messages": [
        {"role": "user", "content": "Write one line about spring"}]}, format="json",
        HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200, response.content
    assert "spring" in response.json()["choices"][0]["message"]["content"]
    assert fake_upstream.requests[-1]["authorization"] == "Bearer sk-test"
    assert CreditAccount.objects.get(user__username="demo").balance < Decimal("10")


def test_a_bad_model_list_is_a_clear_error(seed, monkeypatch):
    from django.core.management.base import CommandError

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_MODELS", "gpt-x:1")
    with pytest.raises(CommandError, match="name:input_price:output_price"):
        seed()
