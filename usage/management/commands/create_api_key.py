from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from usage.billing.keys import create_api_key


class Command(BaseCommand):
    help = "Creates an API key for USERNAME (creating the user if missing) and prints only the key."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli")
        parser.add_argument("--staff", action="store_true", help="Make the user staff.")
        parser.add_argument("--project", default="")

    def handle(self, *args, username: str, name: str, staff: bool, project: str, **options):
        user, _ = get_user_model().objects.get_or_create(username=username)
        if staff and not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
        _, raw = create_api_key(user=user, name=name, project=project)
        self.stdout.write(raw)
