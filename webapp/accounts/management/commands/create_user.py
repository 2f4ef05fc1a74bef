"""Create a user and an API key for it; the key is printed once and never stored."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from webapp.accounts.services import api_key_create, user_create
from webapp.core.exceptions import ApplicationError


class Command(BaseCommand):
    help = (
        "Create a user with an API key (printed once). Without --password the user cannot "
        "log in to the browser."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", default=None, help="for browser log-in (optional)")
        parser.add_argument("--staff", action="store_true", help="may use the admin")
        parser.add_argument("--superuser", action="store_true")
        parser.add_argument("--key-name", default="default", help="label of the API key")
        parser.add_argument("--no-key", action="store_true", help="create no API key")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = user_create(
                username=options["username"],
                email=options["email"],
                password=options["password"],
                is_staff=options["staff"] or options["superuser"],
                is_superuser=options["superuser"],
            )
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"created user {user.username} (id {user.pk})")
        if not options["no_key"]:
            _, raw = api_key_create(user=user, name=options["key_name"])
            self.stdout.write(f"API key (shown once, store it now): {raw}")
