"""`manage.py resumebatch ID`: resume a paused batch."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import services


class Command(BaseCommand):
    help = "Resume a paused batch: workers start its items again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("batch_id", type=uuid.UUID)

    def handle(self, *args: Any, **options: Any) -> None:
        result = services.resume_batch(batch_id=options["batch_id"])
        if result.outcome is services.Transition.NOT_FOUND:
            raise CommandError(f"No batch {options['batch_id']}.")
        assert result.batch is not None
        if result.outcome is services.Transition.REFUSED:
            raise CommandError(f"Batch {result.batch.id} is not paused ({result.batch.status}).")
        self.stdout.write(f"{result.batch.id} {result.batch.status}")
