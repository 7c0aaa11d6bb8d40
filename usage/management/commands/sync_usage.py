from datetime import datetime, time

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime

from usage.periods import quota_zone
from usage.sync import SyncError, sync_usage

BAR = 30


class Command(BaseCommand):
    help = ("Pushes unsynced usage records to BILLING_SYNC_URL in batches (idempotency key per batch, retries "
            "with backoff, per-user sync status). Safe to run twice or to kill midway and run again.")

    def add_arguments(self, parser):
        parser.add_argument("--user", help="Only this username.")
        parser.add_argument("--since", help="Only records from this date (YYYY-MM-DD, local) or ISO datetime.")
        parser.add_argument("--batch-size", type=int, default=200)
        parser.add_argument("--url", help="Override BILLING_SYNC_URL.")
        parser.add_argument("--retries", type=int, default=4)
        parser.add_argument("--backoff", type=float, default=0.5, help="First retry delay in seconds (doubles).")

    def _since(self, value: str | None) -> datetime | None:
        if not value:
            return None
        moment = parse_datetime(value)
        if moment is None:
            day = parse_date(value)
            if day is None:
                raise CommandError(f"--since: not a date or datetime: {value!r}")
            moment = datetime.combine(day, time.min)
        return moment if moment.tzinfo else moment.replace(tzinfo=quota_zone())

    def _progress(self, username: str, done: int, total: int) -> None:
        filled = BAR if not total else int(BAR * done / total)
        self.stdout.write(f"{username:<20} [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total}")

    def handle(self, *args, user, since, batch_size, url, retries, backoff, **options):
        try:
            report = sync_usage(url=url, username=user, since=self._since(since), batch_size=batch_size,
                                progress=self._progress, retries=retries, backoff=backoff)
        except SyncError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"synced {report.records} records in {report.batches} batches for {report.users} users")
        for username in report.skipped:
            self.stdout.write(f"{username}: skipped, another sync_usage run is sending this user's records")
        if report.failed:
            for username, error in report.failed.items():
                self.stderr.write(f"{username}: {error}")
            raise CommandError(f"sync failed for {len(report.failed)} user(s); run again to resume")
