"""`manage.py cancelbatch ID`: request cooperative cancellation of a batch."""

from __future__ import annotations

import time
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import services
from batch.management.commands._types import non_negative_float
from batch.models import BatchJob, BatchStatus


class Command(BaseCommand):
    help = "Cancel a batch: pending items at once, running ones at their next checkpoint."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("batch_id", type=uuid.UUID)
        parser.add_argument("--wait", type=non_negative_float, default=0, help="seconds to wait for the batch to stop")

    def handle(self, *args: Any, **options: Any) -> None:
        result = services.request_cancel(batch_id=options["batch_id"])
        if result.outcome is services.CancelOutcome.NOT_FOUND:
            raise CommandError(f"No batch {options['batch_id']}.")
        assert result.batch is not None
        if result.outcome is services.CancelOutcome.TERMINAL:
            raise CommandError(f"Batch {result.batch.id} already finished ({result.batch.status}).")
        batch = self._wait(result.batch, options["wait"])
        self.stdout.write(f"{batch.id} {batch.status} (running items: {batch.running_items})")

    def _wait(self, batch: BatchJob, seconds: float) -> BatchJob:
        deadline = time.monotonic() + seconds
        while batch.status == BatchStatus.CANCELLING and time.monotonic() < deadline:
            time.sleep(0.1)
            batch.refresh_from_db()
        return batch
