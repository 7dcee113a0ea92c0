"""The database side of a batch run: async calls into `batch.services`, retried and coalesced.

All of a worker's database calls run on asgiref's single sync thread (thread-sensitive
`sync_to_async`), so the worker holds one connection for its bookkeeping however many items
run. Completions that arrive while a write is in flight are written together by the next
one (group commit), and the runner's next claim rides in that same transaction: under load
one transaction completes and claims many items.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, InternalError, OperationalError, close_old_connections, connection

from batch import services
from batch.models import ItemStatus
from batch.services import Claim, ClaimedItem, Handover, Outcome, Step

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 5.0
# Reserved items one worker holds per batch at most: twice the most one write tops up, so
# that items which finish at once have a full set to run while the next one is reserved.
MAX_RESERVED = 512
WRITE_TIME_WEIGHT = 0.2  # of the newest write in the moving average of write durations


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
    """Coalesces completions, handovers and the claim that follows them into one write.

    Completions queued while a write is in flight go together in the next one. A claim
    rides in the same write as the completions queued before it (they are written first, so
    they free the cap it claims from): under load one transaction completes and claims many.
    A handover is queued before the completion of the item it replaces, so both are in the
    same write and the running count in the database never drops below what runs here.

    `plan` may add to a step just before it is written; `settle` sees every step's result
    (None if the write failed) before its waiters wake.
    """

    def __init__(
        self,
        write: Callable[[Step], Claim],
        *,
        release: Callable[[list[int]], Awaitable[None]] | None = None,
        plan: Callable[[Step], None] | None = None,
        settle: Callable[[Step, Claim | None], Awaitable[None]] | None = None,
    ) -> None:
        self._write = write
        self._release = release
        self._plan = plan
        self._settle = settle
        self._queue: list[Outcome] = []
        self._started: list[Handover] = []
        self._next: asyncio.Future[None] | None = None
        self._claim: tuple[int, asyncio.Future[Claim]] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._given_back: list[int] = []

    async def give_back(self, item_ids: list[int]) -> None:
        """Queue reservations to give back with the next write, and wait until it is done."""
        self._given_back.extend(item_ids)
        await asyncio.shield(self._next_write())

    def hand_over(self, handover: Handover) -> None:
        """Queue a handover; it is written with the next completions (queue those at once)."""
        self._started.append(handover)
        self._ensure_drainer()

    async def submit(self, outcomes: list[Outcome]) -> None:
        """Queue `outcomes` at once (before suspending) and wait until they are written."""
        written = self.enqueue(outcomes)
        # Shielded: a cancelled item must not abort a write that carries other items too.
        await asyncio.shield(written)

    def enqueue(self, outcomes: list[Outcome]) -> asyncio.Future[None]:
        """Queue `outcomes` for the next write; the future resolves once it is done.

        Raises the error of an earlier write that failed for good (not a transient one:
        those `call_db` retries), so the caller stops rather than queue into a dead store."""
        if self._failure is not None:
            raise self._failure
        self._queue.extend(outcomes)
        return self._next_write()

    def _next_write(self) -> asyncio.Future[None]:
        """The future of the write that will carry what was just queued."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self._ensure_drainer()
        return self._next

    async def flush(self) -> None:
        """Wait until everything queued so far is written; raise a lasting write failure."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)
        if self._failure is not None:
            raise self._failure

    async def claim(self, limit: int) -> Claim:
        if self._claim is not None:
            raise RuntimeError("a claim is already queued")
        claimed: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._claim = (limit, claimed)
        self._ensure_drainer()
        return await claimed

    async def _write_isolating_refusals(self, step: Step) -> Claim:
        """Write; if the database refuses the group (a value it cannot store), write the
        outcomes one by one so only the offending item fails, then claim on its own."""
        try:
            return await call_db(self._write, step)
        except DatabaseError:
            if not step.outcomes:
                raise
            logger.exception("the database refused a group of %d outcomes; writing them one by one", len(step.outcomes))
        refused: list[int] = []
        if step.started:  # first: the items they replace are among the outcomes
            refused = (await call_db(self._write, Step(started=step.started))).refused
        for outcome in step.outcomes:
            try:
                await call_db(self._write, Step(outcomes=[outcome]))
            except DatabaseError as exc:
                await call_db(self._write, Step(outcomes=[unstorable(outcome, exc)]))
        rest = dataclasses.replace(step, outcomes=[], started=[])
        return dataclasses.replace(await call_db(self._write, rest), refused=refused)

    def _ensure_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._queue or self._started or self._given_back or self._claim is not None:
            step = Step(outcomes=self._queue, started=self._started, give_back=self._given_back)
            self._queue, self._started, self._given_back = [], [], []
            written, self._next = self._next, None
            claim, self._claim = self._claim, None
            step.claim, claimed = claim if claim is not None else (0, None)
            if self._plan is not None:
                self._plan(step)
            try:
                result = await self._write_isolating_refusals(step)
            except BaseException as exc:
                if self._settle is not None:
                    await self._settle(step, None)
                for future in (written, claimed):
                    if future is not None and not future.done():
                        future.set_exception(exc)
                        future.exception()  # retrieved: outcomes may be queued with nobody waiting
                if isinstance(exc, asyncio.CancelledError):
                    raise
                logger.error("a write failed for good; this batch's run stops", exc_info=exc)
                self._failure = exc
            else:
                if self._settle is not None:
                    await self._settle(step, result)
                if written is not None:
                    written.set_result(None)
                if claimed is not None and not claimed.done():
                    claimed.set_result(result)
                elif claimed is not None and result.items and self._release is not None:
                    # Its caller was cancelled during the write: give the items back now
                    # rather than leave them running, unrun, until their lease expires.
                    await self._release([item.id for item in result.items])


class DatabaseStore:
    """`BatchStore` of one batch for one worker, backed by `batch.services`.

    It also keeps the worker's reservations of the batch: pending items leased to this
    worker, each started only in place of one of its items that finished (`take_reserved`),
    so a slot goes from one item to the next without waiting for a database round trip.
    `reserve_target` (set by the runner) is how many it tries to hold for the items running
    now; every write tops up. A claim also reserves `reserve_depth` for each item it starts, so
    a worker whose claims find the cap full holds none.
    """

    def __init__(self, *, batch_id: uuid.UUID, worker_id: str, lease_seconds: float) -> None:
        self.batch_id = batch_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.reserve_target = 0
        self.reserve_depth = 0
        self.start_rate = 0.0
        self.share: int | None = None  # from the last write: see `Claim.share`
        self._write_seconds = 0.0  # moving average, from plan to settle
        self._write_began = 0.0
        self._reserved: deque[ClaimedItem] = deque()
        self._promoting: dict[int, ClaimedItem] = {}
        self._over_cap = False
        self._handing_over = True  # False once a step says the batch no longer runs
        self._closed = False
        self._refused_callback: Callable[[list[int]], None] | None = None
        self._writes = GroupCommit(self._write, release=self.release, plan=self._plan, settle=self._settle)

    async def claim(self, limit: int) -> Claim:
        return await self._writes.claim(limit)

    async def complete(self, outcomes: list[Outcome]) -> None:
        await self._writes.submit(outcomes)

    def enqueue(self, outcomes: list[Outcome]) -> None:
        self._writes.enqueue(outcomes)

    async def flush(self) -> None:
        await self._writes.flush()

    async def release(self, item_ids: list[int]) -> None:
        await call_db(services.release_items, batch_id=self.batch_id, worker_id=self.worker_id, item_ids=item_ids)

    def take_reserved(self) -> ClaimedItem | None:
        """A reserved item to start now in place of one that finished; None to free the slot."""
        if self._over_cap or self._closed or not self._handing_over or not self._reserved:
            return None
        item = self._reserved.popleft()
        self._writes.hand_over(Handover(item.id))
        return item

    def reserved_item_ids(self) -> list[int]:
        return [item.id for item in self._reserved] + list(self._promoting)

    def on_refused(self, callback: Callable[[list[int]], None]) -> None:
        self._refused_callback = callback

    async def trim(self, keep: int) -> None:
        """Give back the reservations beyond the first `keep` (another batch needs the slots)."""
        surplus: list[int] = []
        while len(self._reserved) > max(keep, 0):
            surplus.append(self._reserved.pop().id)
        if surplus:
            await self._writes.give_back(surplus)

    async def close(self) -> None:
        """Reserve nothing more and give the reservations back (cancelled if cancelling), in
        the next write: on a cancel, with the outcomes of the items that stop."""
        self._closed, self.reserve_target, self.reserve_depth = True, 0, 0
        ids = [item.id for item in self._reserved]
        self._reserved.clear()
        if ids:
            await self._writes.give_back(ids)

    def _plan(self, step: Step) -> None:
        self._write_began = time.monotonic()
        if self._closed:
            return
        while len(step.promote) < step.claim and self._reserved:  # a free slot takes a reserved item first
            item = self._reserved.popleft()
            self._promoting[item.id] = item
            step.promote.append(item.id)
        held = len(self._reserved) + len(self._promoting)
        # Top up to the target what will still be held when this write returns: items that
        # finish at once use up everything held meanwhile.
        left = max(0, held - int(self.start_rate * self._write_seconds))
        most = min(MAX_RESERVED // 2, MAX_RESERVED - held)  # one write's top-up
        step.reserve = max(0, min(self.reserve_target - left, most))
        if step.claim:  # for the items the claim starts: none if the cap is full
            step.reserve_per_claim = max(0, min(self.reserve_depth, (most - step.reserve) // step.claim))

    async def _settle(self, step: Step, result: Claim | None) -> None:
        took = time.monotonic() - self._write_began
        if self._write_seconds:  # a write that sat out retries says little about the next ones
            took = min(took, 2 * self._write_seconds + 0.01)
        self._write_seconds += WRITE_TIME_WEIGHT * (took - self._write_seconds)
        started = {item.id for item in result.items} if result else set()
        promoted = [self._promoting.pop(item_id) for item_id in step.promote]
        kept = [item for item in promoted if item.id not in started]
        if result is None:
            self._reserved.extendleft(reversed(kept))
            return
        self._over_cap, self.share = result.over_cap, result.share
        self._handing_over = result.status in ("pending", "running")  # not once cancelling
        # Below, reservations go back with `release` (a transaction of its own), not
        # `give_back`: this runs inside the write loop, which would wait for itself.
        if result.refused:
            # The reservations were lost (leases expired while renewals failed): stop those
            # runs, and drop every other reservation too, which may be lost the same way.
            if self._refused_callback is not None:
                self._refused_callback(result.refused)
            dropped = [item.id for item in [*kept, *self._reserved, *result.reserved]]
            self._reserved.clear()
            if dropped:
                await self.release(dropped)
            return
        if self._closed:
            orphans = [item.id for item in [*kept, *result.reserved]]
            if orphans:
                await self.release(orphans)
            return
        self._reserved.extendleft(reversed(kept))  # not started (cap): still reserved, first in line
        self._reserved.extend(result.reserved)

    def _write(self, step: Step) -> Claim:
        return services.run_step(
            batch_id=self.batch_id, worker_id=self.worker_id, lease_seconds=self.lease_seconds, step=step
        )
