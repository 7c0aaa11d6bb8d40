import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from agents.models import Agent, LLMModel, Provider
from usage.models import ApiKey

pytestmark = pytest.mark.django_db


def test_seed_is_idempotent_and_keeps_password(tmp_path, monkeypatch, capsys):
    from agents.management.commands import seed_demo

    monkeypatch.setattr(seed_demo, "STATE_DIR", tmp_path)
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    call_command("seed_demo")
    first = capsys.readouterr().out
    call_command("seed_demo")
    second = capsys.readouterr().out
    assert Provider.objects.filter(kind="demo").count() == 1
    assert LLMModel.objects.filter(name="demo-chat").count() == 1
    assert Agent.objects.filter(slug="demo").count() == 1
    assert ApiKey.objects.count() == 1
    assert first == second  # same login and the same demo key
    password = (tmp_path / "admin_password").read_text()
    assert get_user_model().objects.get(username="admin").check_password(password)


def test_seed_sets_password_from_environment(tmp_path, monkeypatch):
    from agents.management.commands import seed_demo

    monkeypatch.setattr(seed_demo, "STATE_DIR", tmp_path)
    monkeypatch.setenv("ADMIN_PASSWORD", "s3cret-pass")
    call_command("seed_demo")
    assert get_user_model().objects.get(username="admin").check_password("s3cret-pass")
