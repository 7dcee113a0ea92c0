"""`manage.py pausebatch ID`: pause a batch (no new items start; running ones finish)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import selectors, services
from batch.management.commands._types import non_negative_float
from batch.models import BatchJob, BatchStatus


class Command(BaseCommand):
    help = "Pause a batch: workers start no more of its items; running ones finish."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("batch_id", type=uuid.UUID)
        parser.add_argument(
            "--wait", type=non_negative_float, default=0, help="seconds to wait for its running items to finish"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        result = services.pause_batch(batch_id=options["batch_id"])
        if result.outcome is services.Transition.NOT_FOUND:
            raise CommandError(f"No batch {options['batch_id']}.")
        assert result.batch is not None
        if result.outcome is services.Transition.REFUSED:
            raise CommandError(f"Batch {result.batch.id} cannot be paused ({result.batch.status}).")
        batch, settled = self._wait(result.batch, options["wait"])
        note = "" if settled else ", still finishing"
        self.stdout.write(f"{batch.id} {batch.status} (running items: {batch.running_items}{note})")

    def _wait(self, batch: BatchJob, seconds: float) -> tuple[BatchJob, bool]:
        deadline = time.monotonic() + seconds
        settled = selectors.pause_settled(batch)
        while batch.status == BatchStatus.PAUSED and not settled and time.monotonic() < deadline:
            time.sleep(0.1)
            batch.refresh_from_db()
            settled = selectors.pause_settled(batch)
        return batch, settled
