"""The database side of a batch run: async calls into `batch.services`, retried and coalesced.

All of a worker's database calls run on asgiref's single sync thread (thread-sensitive
`sync_to_async`), so the worker holds one connection for its bookkeeping however many items
run. Completions that arrive while a write is in flight are written together by the next
one (group commit): one transaction for many items under load, one per item when idle.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, close_old_connections, connection

from batch import services
from batch.services import Claim, Outcome

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 5.0


def _reset_connection() -> None:
    close_old_connections()
    connection.close()


async def call_db(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a sync database function on the shared sync thread, retrying connection loss.

    Transient errors (the server restarted, the connection dropped, SQLite busy) are retried
    with exponential backoff forever: bookkeeping must never kill the worker.
    """
    delay = RETRY_FIRST_DELAY
    attempt = 0
    while True:
        try:
            return await sync_to_async(func, thread_sensitive=True)(*args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            attempt += 1
            logger.warning(
                "database call failed, retrying in %.2fs: %s",
                delay,
                exc,
                extra={"call": func.__name__, "attempt": attempt},
            )
            await sync_to_async(_reset_connection, thread_sensitive=True)()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)


class GroupCommit:
    """Coalesces concurrent `submit` calls into one `write` of everything queued."""

    def __init__(self, write: Callable[[list[Outcome]], object]) -> None:
        self._write = write
        self._queue: list[Outcome] = []
        self._next: asyncio.Future[None] | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, outcomes: list[Outcome]) -> None:
        self._queue.extend(outcomes)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        written = self._next
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        # Shielded: a cancelled item must not abort a write that carries other items too.
        await asyncio.shield(written)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            written, self._next = self._next, None
            assert written is not None
            try:
                await call_db(self._write, batch)
            except BaseException as exc:
                written.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                written.set_result(None)


class DatabaseStore:
    """`BatchStore` of one batch for one worker, backed by `batch.services`."""

    def __init__(self, *, batch_id: uuid.UUID, worker_id: str, lease_seconds: float) -> None:
        self.batch_id = batch_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._completions = GroupCommit(self._write_completions)

    async def claim(self, limit: int) -> Claim:
        return await call_db(
            services.claim_items,
            batch_id=self.batch_id,
            worker_id=self.worker_id,
            limit=limit,
            lease_seconds=self.lease_seconds,
        )

    async def complete(self, outcomes: list[Outcome]) -> None:
        await self._completions.submit(outcomes)

    async def release(self, item_ids: list[int]) -> None:
        await call_db(services.release_items, batch_id=self.batch_id, worker_id=self.worker_id, item_ids=item_ids)

    def _write_completions(self, outcomes: list[Outcome]) -> None:
        services.complete_items(batch_id=self.batch_id, worker_id=self.worker_id, outcomes=outcomes)
