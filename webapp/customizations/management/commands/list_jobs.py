"""List fine-tuning jobs for operators (all users), newest first."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from webapp.customizations.models import FineTuningJob


class Command(BaseCommand):
    help = "List fine-tuning jobs: id, owner, base, status/stage, progress, model or error."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--status", choices=FineTuningJob.Status.values)
        parser.add_argument("--user", help="only this username's jobs")
        parser.add_argument("--limit", type=int, default=50)

    def handle(self, *args: Any, **options: Any) -> None:
        jobs = FineTuningJob.objects.select_related("owner", "base", "adapter").order_by(
            "-created_at"
        )
        if options["status"]:
            jobs = jobs.filter(status=options["status"])
        if options["user"]:
            jobs = jobs.filter(owner__username=options["user"])
        rows = [("JOB", "OWNER", "BASE", "STATUS", "PROGRESS", "CREATED", "MODEL / ERROR")]
        for job in jobs[: options["limit"]]:
            status = f"{job.status}/{job.stage}" if job.status == "running" else job.status
            outcome = job.fine_tuned_model or (job.error or {}).get("message", "") or ""
            rows.append(
                (
                    job.id,
                    job.owner.username,
                    job.base.name,
                    status,
                    f"{job.progress:.0%}",
                    job.created_at.strftime("%Y-%m-%d %H:%M"),
                    outcome,
                )
            )
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
            self.stdout.write("  ".join([*cells, str(row[-1])]).rstrip())
        if len(rows) == 1:
            self.stdout.write("(no jobs)")
