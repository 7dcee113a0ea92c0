"""The database side of a batch run: async calls into `batch.services`, retried and coalesced.

All of a worker's database calls run on asgiref's single sync thread (thread-sensitive
`sync_to_async`), so the worker holds one connection for its bookkeeping however many items
run. Starts and outcomes that arrive while a write is in flight go together in the next one
(group commit), and every write tops up the items the worker holds, so a slot that frees
starts a held item at once, without waiting for the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, InternalError, OperationalError, close_old_connections, connection

from batch import metrics, services
from batch.models import ItemStatus
from batch.services import ClaimedItem, Outcome, Start, Step, StepResult

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 5.0
MAX_FETCH = 256  # items one write fetches at most


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


class DatabaseStore:
    """One worker's writes about one batch, and the pending items it holds to start next.

    `hold_target` (set by the runner) is how many items to hold; every write fetches up to it.
    A write carries everything queued before it began: an outcome queued before the start of
    the item that took its slot is written no later than that start.
    """

    def __init__(self, *, batch_id: uuid.UUID, worker_id: str, lease_seconds: float) -> None:
        self.batch_id = batch_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.hold_target = 0
        self.exhausted = False  # the last fetch found fewer items than it asked for
        self.status: str | None = None  # the batch's, as the last write that read it saw
        self.on_refused: Callable[[list[int]], None] = lambda item_ids: None
        self._held: deque[ClaimedItem] = deque()
        self._started: list[Start] = []
        self._outcomes: list[Outcome] = []
        self._give_back: list[int] = []
        self._fetch_wanted = False
        self._closed = False
        self._written: asyncio.Future[None] | None = None  # of the next write
        self._drainer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # --- what the runner calls -------------------------------------------------------------

    def take(self) -> ClaimedItem | None:
        """A held item to start now (its start is queued for the next write), or None."""
        if not self._held:
            return None
        item = self._held.popleft()
        self._started.append(Start(item.id))
        self._ensure_drainer()
        return item

    def held_item_ids(self) -> list[int]:
        return [item.id for item in self._held]

    def enqueue(self, outcomes: list[Outcome]) -> None:
        """Queue outcomes for the next write; raise the error of a write that failed for good."""
        if self._failure is not None:
            raise self._failure
        self._outcomes.extend(outcomes)
        self._next_write()

    async def complete(self, outcomes: list[Outcome]) -> None:
        """Queue outcomes and wait until they are written (shielded: the write carries others')."""
        self.enqueue(outcomes)
        await asyncio.shield(self._next_write())

    async def refill(self) -> None:
        """Fetch items to hold in the next write and wait for it."""
        self._fetch_wanted = True
        await asyncio.shield(self._next_write())

    def trim(self, keep: int) -> None:
        """Give back the held items beyond the first `keep` in the next write."""
        while len(self._held) > max(keep, 0):
            self._give_back.append(self._held.pop().id)
        if self._give_back:
            self._next_write()

    async def close(self) -> None:
        """Hold nothing any more: the held items go back (cancelled if the batch is cancelling)."""
        self._closed = True
        self.trim(0)
        await self.flush()

    async def flush(self) -> None:
        """Wait until everything queued is written; raise a write's lasting failure."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)
        if self._failure is not None:
            raise self._failure

    async def release(self, item_ids: list[int]) -> None:
        """Give items back in a transaction of their own (shutdown; an item stopped by force
        while the batch still runs)."""
        await call_db(services.release_items, batch_id=self.batch_id, worker_id=self.worker_id, item_ids=item_ids)

    # --- the write loop --------------------------------------------------------------------

    def _next_write(self) -> asyncio.Future[None]:
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        self._ensure_drainer()
        return self._written

    def _ensure_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    def _wants_write(self) -> bool:
        return bool(self._started or self._outcomes or self._give_back or self._fetch_wanted)

    async def _drain(self) -> None:
        while self._wants_write():
            fetch = 0
            # Top up once half the target is used (not on every write: one statement fewer
            # on most writes), or when a free slot found nothing held.
            low = len(self._held) <= self.hold_target // 2
            if not self._closed and (self._fetch_wanted or (low and not self.exhausted)):
                fetch = min(MAX_FETCH, max(self.hold_target - len(self._held), int(self._fetch_wanted)))
            step = Step(started=self._started, outcomes=self._outcomes, give_back=self._give_back, fetch=fetch)
            self._started, self._outcomes, self._give_back, self._fetch_wanted = [], [], [], False
            written, self._written = self._written, None
            try:
                result = await self._write_isolating_refusals(step)
            except BaseException as exc:
                if written is not None and not written.done():
                    written.set_exception(exc)
                    written.exception()  # retrieved: outcomes may be queued with nobody waiting
                if isinstance(exc, asyncio.CancelledError):
                    raise
                logger.error("a write failed for good; this batch's run stops", exc_info=exc)
                self._failure = exc
                return
            self._settle(step, result)
            if written is not None:
                written.set_result(None)

    def _settle(self, step: Step, result: StepResult) -> None:
        if result.status is not None:
            self.status = result.status
        if step.fetch:
            self.exhausted = len(result.fetched) < step.fetch
        if self._closed:
            self._give_back.extend(item.id for item in result.fetched)  # written by the next turn
        else:
            self._held.extend(result.fetched)
        if result.refused:
            self.on_refused(result.refused)

    def _write(self, step: Step) -> StepResult:
        with metrics.step_timer():
            return services.run_step(
                batch_id=self.batch_id, worker_id=self.worker_id, lease_seconds=self.lease_seconds, step=step
            )

    async def _write_isolating_refusals(self, step: Step) -> StepResult:
        """Write; if the database refuses the step (a value it cannot store), write the outcomes
        one by one so only the offending item fails, then the rest of the step."""
        try:
            return await call_db(self._write, step)
        except (DatabaseError, UnicodeEncodeError):  # the driver cannot encode a lone surrogate
            if not step.outcomes:
                raise
            logger.exception("the database refused a step of %d outcomes; writing them one by one", len(step.outcomes))
        refused = (await call_db(self._write, Step(started=step.started))).refused  # first: outcomes may need them
        for outcome in step.outcomes:
            try:
                await call_db(self._write, Step(outcomes=[outcome]))
            except (DatabaseError, UnicodeEncodeError) as exc:
                await call_db(self._write, Step(outcomes=[unstorable(outcome, exc)]))
        rest = await call_db(self._write, dataclasses.replace(step, started=[], outcomes=[]))
        return dataclasses.replace(rest, refused=refused)
