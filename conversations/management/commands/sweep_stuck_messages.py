"""Ends replies stuck in `processing` (their worker died) as `error`, keeping their text. Safe to run twice."""

from django.conf import settings
from django.core.management.base import BaseCommand

from conversations.services import sweep_stuck_messages


class Command(BaseCommand):
    help = "Mark assistant replies stuck in `processing` with no progress as `error` (run it every few minutes)."

    def add_arguments(self, parser):
        # By default: once the conversation lock has expired, nothing can still be writing the reply.
        parser.add_argument("--older-than", type=int, default=settings.CONVERSATION_LOCK_SECONDS,
                            help="Seconds without progress (default: CONVERSATION_LOCK_SECONDS).")

    def handle(self, *args, older_than: int, **options):
        swept = sweep_stuck_messages(older_than_seconds=older_than)
        self.stdout.write(f"swept {swept} stuck message(s)")
