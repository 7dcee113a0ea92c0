"""`manage.py submitbatch HANDLER`: submit a batch from a file or generated items."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import services
from batch.management.commands._types import positive_int


def _param(raw: str) -> tuple[str, Any]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise CommandError(f"--param expects key=value, got {raw!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def read_items(path: Path, fmt: str) -> list[Any]:
    """Items from a JSON list, JSON lines, or CSV with a header row."""
    fmt = fmt if fmt != "auto" else {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix, "json")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            if fmt == "csv":
                return list(csv.DictReader(handle))
            if fmt == "jsonl":
                return [json.loads(line) for line in handle if line.strip()]
            return list(json.load(handle))
    except (OSError, ValueError, TypeError) as exc:
        raise CommandError(f"Cannot read items from {path}: {exc}") from None


class Command(BaseCommand):
    help = "Submit a batch. Items come from --file, from --stores x --products pairs, or --count copies."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("handler", help="handler name, e.g. demo.forecast")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--file", type=Path, help="JSON list, JSON lines (.jsonl) or CSV (.csv) of item params")
        source.add_argument("--stores", type=positive_int, help="generate store x product pairs (with --products)")
        source.add_argument("--count", type=positive_int, help="this many items with the same --param values")
        parser.add_argument("--products", type=positive_int, default=1)
        parser.add_argument("--format", choices=["auto", "json", "jsonl", "csv"], default="auto")
        parser.add_argument("--param", action="append", default=[], type=_param, help="key=value added to every item")
        parser.add_argument("--max-parallel", type=positive_int)
        parser.add_argument("--name", default="")
        parser.add_argument("--callback-url", default="", help="POSTed the batch JSON when it ends (allowed hosts)")

    def handle(self, *args: Any, **options: Any) -> None:
        extra = dict(options["param"])
        if options["file"] is not None:
            items = read_items(options["file"], options["format"])
            items = [{**item, **extra} if isinstance(item, dict) else item for item in items]
        elif options["stores"] is not None:
            items = [
                {"store": f"S{store:03d}", "product": f"P{product:04d}", **extra}
                for store in range(1, options["stores"] + 1)
                for product in range(1, options["products"] + 1)
            ]
        else:
            items = [dict(extra) for _ in range(options["count"])]
        try:
            result = services.submit_batch(
                handler=options["handler"],
                items=items,
                max_parallel=options["max_parallel"],
                name=options["name"],
                callback_url=options["callback_url"],
            )
        except services.SubmitError as exc:
            raise CommandError(f"Batch refused: {json.dumps(exc.errors, default=str)[:2000]}") from None
        batch = result.batch
        if options["verbosity"] == 0:
            self.stdout.write(str(batch.id))
        else:
            self.stdout.write(
                f"Submitted batch {batch.id}: {batch.total_items} {batch.handler} items, "
                f"max_parallel {batch.max_parallel}"
            )
