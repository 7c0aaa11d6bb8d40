"""Quota months and report days: calendar periods in settings.QUOTA_TIME_ZONE."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils import timezone


def quota_zone() -> ZoneInfo:
    return ZoneInfo(settings.QUOTA_TIME_ZONE)


def local_day(moment: datetime | None = None) -> date:
    return (moment or timezone.now()).astimezone(quota_zone()).date()


def month_start(moment: datetime | None = None) -> date:
    """The quota period a moment falls in: the first day of its local calendar month."""
    return local_day(moment).replace(day=1)


def next_month(period: date) -> date:
    return (period.replace(day=28) + timedelta(days=4)).replace(day=1)


def day_start(day: date) -> datetime:
    """Local midnight at the start of `day`, as an aware datetime (correct across DST changes)."""
    return datetime.combine(day, time.min, tzinfo=quota_zone())


def month_bounds(period: date) -> tuple[datetime, datetime]:
    return day_start(period), day_start(next_month(period))
