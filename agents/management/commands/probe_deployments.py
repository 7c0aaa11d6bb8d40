"""Probe every enabled deployment with a one-token request and store its health (safe to run twice).

Run it periodically (cron, systemd timer): `manage.py probe_deployments [--model NAME] [--timeout S]`.
Live traffic decides health while calls flow; the probe speaks for idle deployments.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from agents.llm import clients, registry
from agents.llm.types import ChatRequest, LLMError
from agents.models import Deployment, HealthStatus

PROBE_MESSAGES = [{"role": "user", "content": "ping"}]


async def probe(deployment: registry.DeploymentInfo, timeout: float) -> tuple[str, int, str]:
    """(status, latency ms, error) for one deployment."""
    adapter = clients.adapter_for(replace(deployment, timeout=min(deployment.timeout, timeout)))
    request = ChatRequest(model=deployment.model, messages=PROBE_MESSAGES, max_tokens=1, temperature=0)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async for _ in adapter.stream(request, deployment.upstream_model):
                pass
    except (LLMError, TimeoutError) as exc:
        code = exc.code if isinstance(exc, LLMError) else "upstream_timeout"
        return HealthStatus.UNHEALTHY, int((time.monotonic() - started) * 1000), code
    latency = int((time.monotonic() - started) * 1000)
    slow = latency > settings.LLM_SLOW_LATENCY_MS
    return (HealthStatus.DEGRADED if slow else HealthStatus.HEALTHY), latency, ""


class Command(BaseCommand):
    help = "Probe enabled deployments with a one-token request and record their health."

    def add_arguments(self, parser):
        parser.add_argument("--model", help="Only this public model.")
        parser.add_argument("--timeout", type=float, default=15.0, help="Seconds per probe (default 15).")

    def handle(self, *args, model: str | None = None, timeout: float = 15.0, **options):
        deployments = Deployment.objects.filter(enabled=True, provider__enabled=True, model__enabled=True)
        if model:
            deployments = deployments.filter(model__name=model)
        infos = [registry.deployment_info(d) for d in deployments.select_related("provider", "model").order_by("id")]

        async def run_all():
            return await asyncio.gather(*(probe(info, timeout) for info in infos))

        results = asyncio.run(run_all()) if infos else []
        now = timezone.now()
        for info, (status, latency, error) in zip(infos, results, strict=True):
            Deployment.objects.filter(pk=info.id).update(health_status=status, last_check_at=now,
                                                         last_latency_ms=latency, last_error=error)
            self.stdout.write(f"{info.model} → {info.provider}/{info.upstream_model}: {status} {latency} ms {error}")
        registry.clear()
        self.stdout.write(f"probed {len(infos)} deployment(s)")
