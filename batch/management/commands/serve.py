"""`manage.py serve`: the ASGI server (daphne) and a batch worker in one process.

The embedded default: with no REDIS_URL the channel layer lives in memory, so only a worker
in the same process as the WebSocket consumers can reach the dashboard. This command runs
both on one event loop. With Redis, `serve --no-worker` plus any number of `runbatch`
workers is the production shape (or plain `daphne <project>.asgi:application`).
"""

from __future__ import annotations

# Twisted is import-order sensitive: daphne.server installs the asyncio reactor first.
import daphne.server  # isort:skip

import asyncio
import logging
from typing import Any

from daphne.endpoints import build_endpoint_description_strings
from django.core.management.base import BaseCommand, CommandParser
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from batch.events import publisher
from batch.management.commands._types import positive_int
from batch.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)
reactor: Any = _reactor  # typed as an interface by Twisted; the installed asyncio reactor


class Command(BaseCommand):
    help = "Serve the site over ASGI (HTTP + WebSocket) with a batch worker in the same process."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
        parser.add_argument("--no-worker", action="store_true", help="serve only; run `runbatch` workers apart")
        parser.add_argument("--concurrency", type=positive_int, help="items the embedded worker runs at once")

    def handle(self, *args: Any, **options: Any) -> None:
        from channels.routing import get_default_application

        application = get_default_application()  # settings.ASGI_APPLICATION, the project's
        worker = None
        if not options["no_worker"]:
            worker = Worker(WorkerConfig.from_settings(handle_signals=False, concurrency=options["concurrency"]))
        server = daphne.server.Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=options["host"], port=options["port"]),
            ready_callable=lambda: self._ready(worker, options),
            verbosity=options["verbosity"],
        )
        server.run()

    def _ready(self, worker: Worker | None, options: dict[str, Any]) -> None:
        loop = asyncio.get_event_loop()
        publisher.bind_loop(loop)
        self.stdout.write(f"Serving on http://{options['host']}:{options['port']}/admin/batch/dashboard/")
        if worker is None:
            return
        task = loop.create_task(self._run_worker(worker))

        def stop_worker() -> defer.Deferred[None]:
            worker.stop()
            return defer.Deferred.fromFuture(task)

        reactor.addSystemEventTrigger("before", "shutdown", stop_worker)

    async def _run_worker(self, worker: Worker) -> None:
        try:
            await worker.run()
        except Exception:
            logger.exception("the embedded worker stopped; stopping the server")
            reactor.stop()
