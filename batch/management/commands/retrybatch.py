"""`manage.py retrybatch ID [--include failed cancelled]`: run a finished batch's failed items again."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import services
from batch.services.retry import RETRYABLE, RetryOutcome

REFUSED = {
    RetryOutcome.NOT_FINISHED: "has not finished",
    RetryOutcome.NOTHING_TO_RETRY: "has no items of those statuses",
}


class Command(BaseCommand):
    help = "Submit a finished batch's failed (or also cancelled) items again as a new batch; prints its id."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("batch_id", type=uuid.UUID)
        parser.add_argument(
            "--include", nargs="+", choices=[str(s) for s in RETRYABLE], default=["failed"], help="default: failed"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        result = services.retry_batch(batch_id=options["batch_id"], include=options["include"])
        if result.outcome is RetryOutcome.NOT_FOUND:
            raise CommandError(f"No batch {options['batch_id']}.")
        assert result.batch is not None
        if result.outcome in REFUSED:
            raise CommandError(f"Batch {result.batch.id} {REFUSED[result.outcome]} ({result.batch.status}).")
        self.stdout.write(f"{result.batch.id} {result.batch.status} {result.batch.total_items} items")
