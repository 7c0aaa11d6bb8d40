from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date

from usage.billing.counters import rebuild_rollups
from usage.periods import local_day


class Command(BaseCommand):
    help = "Recomputes the daily usage rollups (used by /api/usage/stats/) from the raw records for a range of days."

    def add_arguments(self, parser):
        parser.add_argument("--since", help="First local day (YYYY-MM-DD); default 31 days ago.")
        parser.add_argument("--until", help="Last local day (YYYY-MM-DD); default today.")

    def handle(self, *args, since, until, **options):
        end = parse_date(until) if until else local_day()
        start = parse_date(since) if since else end - timedelta(days=31)
        if start is None or end is None or start > end:
            raise CommandError("Give --since and --until as YYYY-MM-DD with since <= until.")
        rows = rebuild_rollups(start=start, end=end)
        self.stdout.write(f"rebuilt {rows} rollup rows for {start}..{end}")
