"""Quota alert delivery: Django's email backend and an optional HMAC-signed webhook.

Runs after the money transaction has committed; a delivery failure is logged and never undoes a charge.
Webhook: POST settings.ALERT_WEBHOOK_URL with a JSON body and
`X-Aiwriter-Signature: sha256=<hex HMAC-SHA256 of the body with settings.ALERT_WEBHOOK_SECRET>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.request

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail

from usage.models import QuotaAlert

logger = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_SECONDS = 3.0
SIGNATURE_HEADER = "X-Aiwriter-Signature"


def sign(body: bytes, secret: str | None = None) -> str:
    key = (secret if secret is not None else settings.ALERT_WEBHOOK_SECRET).encode()
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def payload(alert: QuotaAlert, username: str) -> dict:
    return {"type": "quota_alert", "id": alert.pk, "user": username, "project": alert.project,
            "period": alert.period.isoformat(), "level": alert.level, "message": alert.message}


def _post_webhook(body: bytes) -> None:
    request = urllib.request.Request(settings.ALERT_WEBHOOK_URL, data=body, method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: sign(body)})
    with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:  # noqa: S310 - configured URL
        response.read()


def deliver(alert: QuotaAlert) -> bool:
    user = get_user_model().objects.filter(pk=alert.user_id).first()
    if user is None:
        return False
    ok = True
    if user.email:
        try:
            send_mail(f"[aiwriter] Quota {alert.level}", alert.message, settings.ALERT_EMAIL_FROM, [user.email])
        except Exception:  # noqa: BLE001 - a mail outage must not fail the call that raised the alert
            logger.exception("quota alert %s: email failed", alert.pk)
            ok = False
    if settings.ALERT_WEBHOOK_URL:
        try:
            _post_webhook(json.dumps(payload(alert, user.get_username())).encode())
        except Exception:  # noqa: BLE001 - same: logged, the alert stays listed as undelivered
            logger.exception("quota alert %s: webhook failed", alert.pk)
            ok = False
    if ok:
        QuotaAlert.objects.filter(pk=alert.pk).update(delivered=True)
    return ok
