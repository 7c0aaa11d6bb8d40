from datetime import timedelta

from django.core.management.base import BaseCommand

from usage.billing.reconcile import reconcile_reservations


class Command(BaseCommand):
    help = ("Settles stale credit holds: a hold whose call was served but not recorded (database error) gets its "
            "record and charge; a hold with no saved outcome is released (or charged in full with --charge-unknown). "
            "Safe to run twice and alongside live traffic.")

    def add_arguments(self, parser):
        parser.add_argument("--older-than", type=int, default=3600, help="Seconds a hold must be old (default 3600).")
        parser.add_argument("--charge-unknown", action="store_true",
                            help="Charge holds with no saved outcome instead of releasing them.")

    def handle(self, *args, older_than: int, charge_unknown: bool, **options):
        done = reconcile_reservations(older_than=timedelta(seconds=older_than), charge_unknown=charge_unknown)
        self.stdout.write(f"charged {done['charged']}, released {done['released']}")
