"""Top up (or adjust) a user's credit from the shell: the same service as the admin's top-up page."""

from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from aiwriter.errors import ApiError
from aiwriter.money import money_str
from usage.billing.ledger import grant_credits
from usage.models import LedgerEntry


class Command(BaseCommand):
    help = "Adds AMOUNT (in CURRENCY) to USERNAME's credit as a ledger top-up; --adjust allows a negative amount."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("amount")
        parser.add_argument("--reason", default="Granted from the command line")
        parser.add_argument("--adjust", action="store_true", help="Record an adjustment (may be negative).")

    def handle(self, *args, username: str, amount: str, reason: str, adjust: bool, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user '{username}'.")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise CommandError(f"'{amount}' is not a number.") from None
        kind = LedgerEntry.Kind.ADJUSTMENT if adjust else LedgerEntry.Kind.TOPUP
        try:
            entry = grant_credits(user=user, amount=value, reason=reason, created_by=None, kind=kind)
        except ApiError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"{username}: {money_str(entry.amount)} {settings.CURRENCY} granted; balance "
                          f"{money_str(entry.balance_after)} {settings.CURRENCY}")
