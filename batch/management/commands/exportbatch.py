"""`manage.py exportbatch ID [--as jsonl|csv] [--output FILE]`: a batch's items, as the export endpoint gives them."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import export
from batch.models import BatchJob


class Command(BaseCommand):
    help = "Write every item of a batch (index order) as JSON Lines or CSV, like GET /api/batches/{id}/export/."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("batch_id", type=uuid.UUID)
        parser.add_argument("--as", dest="fmt", choices=sorted(export.CONTENT_TYPES), default="jsonl")
        parser.add_argument("--output", type=Path, help="a file to write (default: standard output)")

    def handle(self, *args: Any, **options: Any) -> None:
        batch = BatchJob.objects.filter(pk=options["batch_id"]).first()
        if batch is None:
            raise CommandError(f"No batch {options['batch_id']}.")
        if options["output"] is None:
            self._write(batch, options["fmt"], sys.stdout.buffer)
            return
        with options["output"].open("wb") as out:
            self._write(batch, options["fmt"], out)
        self.stderr.write(f"{batch.total_items} items of {batch.id} written to {options['output']}")

    def _write(self, batch: BatchJob, fmt: str, out: BinaryIO) -> None:
        for chunk in export.stream(batch, fmt):
            out.write(chunk)
        out.flush()
