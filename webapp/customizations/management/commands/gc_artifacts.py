"""Remove artifacts under the data directory that no record points at."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from webapp.customizations.services.artifacts import artifacts_collect_garbage


class Command(BaseCommand):
    help = (
        "Garbage-collect orphaned artifacts (uploads, feature caches, checkpoints, adapters) "
        "older than a grace period, e.g. left by crashes or deleted records."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="only list what would go")
        parser.add_argument(
            "--grace-seconds",
            type=int,
            default=3600,
            help="keep anything younger than this (it may be being written now)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        removed = artifacts_collect_garbage(
            dry_run=options["dry_run"], grace_seconds=options["grace_seconds"]
        )
        verb = "would remove" if options["dry_run"] else "removed"
        for path in removed:
            self.stdout.write(f"{verb} {path}")
        self.stdout.write(f"{verb} {len(removed)} orphaned artifact(s)")
