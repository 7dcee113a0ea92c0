"""`manage.py runbatch`: the batch worker. Runs until SIGINT/SIGTERM, then drains."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from batch import metrics
from batch.management.commands._types import non_negative_float, port, positive_float, positive_int
from batch.progress import ProgressDisplay
from batch.services import InvalidValue
from batch.worker import Worker, WorkerConfig


class Command(BaseCommand):
    help = "Run batch items with bounded parallelism until SIGINT/SIGTERM (a second signal stops at once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency", type=positive_int, help="items this process runs at once, all batches together"
        )
        parser.add_argument(
            "--batch", type=uuid.UUID, dest="only_batch", help="run only this batch; exit when it is finished"
        )
        parser.add_argument("--worker-id", help="unique id of this worker (default: host-pid)")
        parser.add_argument("--poll-interval", type=positive_float, help="seconds between database polls")
        parser.add_argument("--item-timeout", type=positive_float, help="fail an item that runs longer than this")
        parser.add_argument("--drain-timeout", type=non_negative_float, help="seconds to let items finish on shutdown")
        parser.add_argument("--exit-when-idle", action="store_true", help="exit once no batch has work left")
        parser.add_argument(
            "--progress",
            choices=["auto", "always", "never"],
            default="auto",
            help="progress display (auto: on a terminal)",
        )
        parser.add_argument(
            "--metrics-port",
            type=port,
            help="serve Prometheus metrics on this port (0: off)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        config = WorkerConfig.from_settings(
            worker_id=options["worker_id"],
            concurrency=options["concurrency"],
            only_batch=options["only_batch"],
            poll_interval=options["poll_interval"],
            item_timeout=options["item_timeout"],
            drain_timeout=options["drain_timeout"],
            exit_when_idle=options["exit_when_idle"] or None,
        )
        tty = sys.stdout.isatty()
        show = options["progress"] == "always" or (options["progress"] == "auto" and tty)
        interval = 0.5 if tty or options["progress"] == "always" else 2.0
        observer = ProgressDisplay(sys.stdout, in_place=tty, interval=interval) if show else None
        metrics_port = settings.BATCH_METRICS_PORT if options["metrics_port"] is None else options["metrics_port"]
        try:
            with metrics.serving(metrics_port, addr=settings.BATCH_METRICS_ADDR):
                asyncio.run(Worker(config, observer=observer).run())
        except InvalidValue as exc:
            raise CommandError(exc.message) from None
        except metrics.ServeError as exc:
            raise CommandError(str(exc)) from None
