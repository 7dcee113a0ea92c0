"""The database side of a batch run: async calls into `batch.services`, retried and coalesced.

All of a worker's database calls run on asgiref's single sync thread (thread-sensitive
`sync_to_async`), so the worker holds one connection for its bookkeeping however many items
run. Completions that arrive while a write is in flight are written together by the next
one (group commit), and the runner's next claim rides in that same transaction: under load
one transaction completes and claims many items.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, InternalError, OperationalError, close_old_connections, connection

from batch import services
from batch.models import ItemStatus
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
        # InternalError covers a failover ("read-only transaction"); data and programming
        # errors are not transient and propagate.
        except (OperationalError, InterfaceError, InternalError) as exc:
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


def unstorable(outcome: Outcome, exc: Exception) -> Outcome:
    """The outcome to record instead of one whose result or error the database refused."""
    error = f"The outcome could not be stored ({type(exc).__name__}); it was {outcome.status}."
    return Outcome(outcome.item_id, ItemStatus.FAILED, error=error, finished_at=outcome.finished_at)


class GroupCommit:
    """Coalesces completions, and the claim that follows them, into one write.

    Completions queued while a write is in flight go together in the next one. A claim
    rides in the same write as the completions queued before it (they are written first, so
    they free the cap it claims from): under load one transaction completes and claims many.
    """

    def __init__(
        self,
        write: Callable[[list[Outcome], int], Claim],
        *,
        release: Callable[[list[int]], Awaitable[None]] | None = None,
    ) -> None:
        self._write = write
        self._release = release
        self._queue: list[Outcome] = []
        self._next: asyncio.Future[None] | None = None
        self._claim: tuple[int, asyncio.Future[Claim]] | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, outcomes: list[Outcome]) -> None:
        """Queue `outcomes` at once (before suspending) and wait until they are written."""
        self._queue.extend(outcomes)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        written = self._next
        self._ensure_drainer()
        # Shielded: a cancelled item must not abort a write that carries other items too.
        await asyncio.shield(written)

    async def claim(self, limit: int) -> Claim:
        if self._claim is not None:
            raise RuntimeError("a claim is already queued")
        claimed: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._claim = (limit, claimed)
        self._ensure_drainer()
        return await claimed

    async def _write_isolating_refusals(self, outcomes: list[Outcome], limit: int) -> Claim:
        """Write; if the database refuses the group (a value it cannot store), write the
        outcomes one by one so only the offending item fails, then claim on its own."""
        try:
            return await call_db(self._write, outcomes, limit)
        except DatabaseError:
            if not outcomes:
                raise
            logger.exception("the database refused a group of %d outcomes; writing them one by one", len(outcomes))
        for outcome in outcomes:
            try:
                await call_db(self._write, [outcome], 0)
            except DatabaseError as exc:
                await call_db(self._write, [unstorable(outcome, exc)], 0)
        return await call_db(self._write, [], limit)

    def _ensure_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._queue or self._claim is not None:
            outcomes, self._queue = self._queue, []
            written, self._next = self._next, None
            claim, self._claim = self._claim, None
            limit, claimed = claim if claim is not None else (0, None)
            try:
                result = await self._write_isolating_refusals(outcomes, limit)
            except BaseException as exc:
                for future in (written, claimed):
                    if future is not None and not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                if written is not None:
                    written.set_result(None)
                if claimed is not None and not claimed.done():
                    claimed.set_result(result)
                elif claimed is not None and result.items and self._release is not None:
                    # Its caller was cancelled during the write: give the items back now
                    # rather than leave them running, unrun, until their lease expires.
                    await self._release([item.id for item in result.items])


class DatabaseStore:
    """`BatchStore` of one batch for one worker, backed by `batch.services`."""

    def __init__(self, *, batch_id: uuid.UUID, worker_id: str, lease_seconds: float) -> None:
        self.batch_id = batch_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._writes = GroupCommit(self._write, release=self.release)

    async def claim(self, limit: int) -> Claim:
        return await self._writes.claim(limit)

    async def complete(self, outcomes: list[Outcome]) -> None:
        await self._writes.submit(outcomes)

    async def release(self, item_ids: list[int]) -> None:
        await call_db(services.release_items, batch_id=self.batch_id, worker_id=self.worker_id, item_ids=item_ids)

    def _write(self, outcomes: list[Outcome], claim_limit: int) -> Claim:
        return services.complete_and_claim(
            batch_id=self.batch_id,
            worker_id=self.worker_id,
            outcomes=outcomes,
            claim_limit=claim_limit,
            lease_seconds=self.lease_seconds,
        )
