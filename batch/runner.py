"""The only code that schedules item execution.

One `BatchRunner` per batch: one `asyncio.Semaphore(effective_parallel)` inside one
`asyncio.TaskGroup`. Items are claimed and spawned lazily as slots free, so memory is
O(parallel), not O(items). Cancellation is cooperative through the batch's `asyncio.Event`;
past the batch's deadline the remaining item tasks are cancelled by force.

The runner knows nothing of Django: it takes its collaborators (a `BatchStore` that claims,
completes and releases items) as arguments, so tests drive it without a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from batch.handlers import HandlerSpec, ItemCancelled, ItemContext
from batch.models import ItemStatus
from batch.services import Claim, ClaimedItem, Outcome

logger = logging.getLogger(__name__)

MAX_CLAIM = 64  # items claimed in one transaction at most
# Reserve enough items per running one to keep its slot busy this long without the database
# (a few step round trips); at least one, at most MAX_DEPTH.
HANDOVER_HORIZON = 0.01
MAX_DEPTH = 64
DURATION_WEIGHT = 0.2  # of the newest item in the moving average of item durations
CLOSE_ON_CRASH_TIMEOUT = 5.0


class BatchStore(Protocol):
    """Persistence the runner needs; `batch.store.DatabaseStore` is the real one."""

    async def claim(self, limit: int) -> Claim: ...

    async def complete(self, outcomes: list[Outcome]) -> None:
        """Persist `outcomes`; takes them before it first suspends (claims queue behind them)."""
        ...

    def enqueue(self, outcomes: list[Outcome]) -> None:
        """Queue `outcomes` for the next write without waiting for it (claims queue behind them).

        Raises the error of an earlier write that failed for good."""
        ...

    async def flush(self) -> None:
        """Wait until everything queued is written; raise a write's lasting failure."""
        ...

    async def release(self, item_ids: list[int]) -> None: ...

    # Reservations (see `batch.store.DatabaseStore`); a store without them returns None / [].
    reserve_target: int  # for the items running here now
    reserve_depth: int  # for each item a claim starts
    start_rate: float  # reserved items the running ones get through per second
    share: int | None  # while other workers wait for the cap: run at most this many here

    def take_reserved(self) -> ClaimedItem | None:
        """A reserved item to start in place of one that finished (a handover), or None."""
        ...

    def reserved_item_ids(self) -> list[int]: ...

    def on_refused(self, callback: Callable[[list[int]], None]) -> None:
        """Call `callback` with handed-over items the database refused (reservation lost)."""
        ...

    async def trim(self, keep: int) -> None:
        """Give back the reservations beyond the first `keep`."""
        ...

    async def close(self) -> None:
        """Give the reservations back; hand nothing over any more."""
        ...


class Limiter:
    """An `asyncio.Semaphore` whose capacity can change while permits are held.

    Growing releases extra permits; shrinking takes free permits at once and keeps a debt
    that the next releases pay, so running work is never interrupted.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._semaphore = asyncio.Semaphore(capacity)
        self._debt = 0
        self._waiting = 0

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1

    @property
    def waiting(self) -> int:
        """How many wait in `acquire`."""
        return self._waiting

    @property
    def in_debt(self) -> bool:
        """Shrunk below the permits held: the next releases are taken back."""
        return self._debt > 0

    def try_acquire(self) -> bool:
        if self._semaphore.locked():
            return False
        # An unlocked semaphore's acquire() completes without suspending.
        coroutine = self._semaphore.acquire()
        try:
            coroutine.send(None)
        except StopIteration:
            return True
        raise RuntimeError("semaphore acquire suspended although it was not locked")

    def release(self) -> None:
        if self._debt:
            self._debt -= 1
        else:
            self._semaphore.release()

    def resize(self, capacity: int) -> None:
        delta, self.capacity = capacity - self.capacity, capacity
        if delta >= 0:
            paid = min(self._debt, delta)
            self._debt -= paid
            for _ in range(delta - paid):
                self._semaphore.release()
            return
        self._debt += -delta
        while self._debt and self.try_acquire():
            self._debt -= 1


@dataclass
class RunnerStats:
    started: int = 0
    finished: int = 0
    peak_running: int = 0


class BatchRunner:
    """Runs the items of one batch, at most `parallel` at a time in this process."""

    def __init__(
        self,
        *,
        batch_id: uuid.UUID,
        handler: HandlerSpec,
        store: BatchStore,
        parallel: int,
        executor: Executor,
        worker_slots: Limiter | None = None,
        item_timeout: float | None = None,
        idle_wait: float = 0.5,
        on_progress: Callable[[ItemContext], None] | None = None,
    ) -> None:
        self.batch_id = batch_id
        self.handler = handler
        self.store = store
        self.executor = executor
        self.item_timeout = item_timeout
        self.idle_wait = idle_wait
        self.on_progress = on_progress
        self.cancel_event = asyncio.Event()
        self.stats = RunnerStats()
        self._limiter = Limiter(parallel)
        self._wanted_parallel = parallel  # the limiter's capacity unless a worker share is lower
        self._worker_slots = worker_slots
        self._stop_claiming = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._superseded: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()
        self._forced = False
        self._releasing = False
        self._group: asyncio.TaskGroup | None = None
        self._mean_duration: float | None = None
        self._closing = False
        self._awaiting_worker_slot = False
        store.on_refused(self._drop_refused)

    # --- control, called by the worker --------------------------------------------------

    @property
    def parallel(self) -> int:
        return self._limiter.capacity

    @property
    def running_item_ids(self) -> list[int]:
        return list(self._running)

    @property
    def leased_item_ids(self) -> list[int]:
        """Items whose leases this worker renews: running here, or reserved for it."""
        return [*self._running, *self.store.reserved_item_ids()]

    def resize(self, parallel: int) -> None:
        self._wanted_parallel = parallel
        self._apply_share()

    def observe_share(self, share: int | None) -> None:
        """The batch's worker share for this worker as just read from the database."""
        self.store.share = share
        self._apply_share()

    def _apply_share(self) -> None:
        """Run at most the batch's worker share here while other workers wait for its cap
        (`Claim.share`): the slots above it are not handed over again, so they free up."""
        share = self.store.share
        capacity = self._wanted_parallel if share is None else max(1, min(self._wanted_parallel, share))
        if capacity != self._limiter.capacity:
            self._limiter.resize(capacity)
            self._wakeup.set()

    def wake(self) -> None:
        """Claim again now: another worker may have freed capacity (released, recovered)."""
        self._wakeup.set()

    def cancel(self) -> None:
        """Cooperative: launch nothing more; running handlers see `ctx.cancelled`."""
        self.cancel_event.set()
        self._wakeup.set()
        self._close_store_soon()

    def force_cancel(self) -> None:
        """Past the drain deadline: cancel the item tasks; their items end cancelled."""
        self.cancel()
        if self._forced:
            return
        self._forced = True
        for task in self._running.values():
            task.cancel()

    def stop_claiming(self) -> None:
        """Graceful shutdown: launch nothing more, let running items finish."""
        self._stop_claiming.set()
        self._wakeup.set()
        self._close_store_soon()

    def _close_store_soon(self) -> None:
        """With nothing of this batch running here, give the reservations back now rather than
        when the loop next gets a slot: it may wait for one behind another batch's long item.
        With items running, the loop does it once the first of them stops, in the same write
        as their outcomes."""
        if self._group is not None and not self._closing and not self._running:
            self._closing = True
            with contextlib.suppress(RuntimeError):  # the group is shutting down: run() closes
                self._group.create_task(self.store.close())

    def abort(self) -> None:
        """Shutdown past its drain: cancel running items and give them back as pending."""
        self.stop_claiming()
        self._releasing = True
        for task in self._running.values():
            task.cancel()

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run items until none is left to claim, then wait for the running ones."""
        try:
            await self._run()
        except Exception:
            # Give the reservations back rather than leave them leased until they expire.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.close(), CLOSE_ON_CRASH_TIMEOUT)
            raise

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            while not self._should_stop():
                self._apply_share()
                slots = await self._acquire_slots()
                if slots == 0:
                    break
                self._wakeup.clear()  # before the claim: a wake-up during it is not lost
                self._set_reserve_target(len(self._running))
                try:
                    claim = await self.store.claim(slots)
                except BaseException:
                    for _ in range(slots):
                        self._release_slot()
                    raise
                for _ in range(slots - len(claim.items)):
                    self._release_slot()
                for item in claim.items:
                    self._start(item)
                if not claim.items:
                    if claim.pending == 0 or claim.status not in ("pending", "running"):
                        break
                    await self._wait_for_wakeup()  # cap reached by other workers' items
            await self.store.close()
        await self.store.flush()

    def _start(self, item: ClaimedItem) -> None:
        assert self._group is not None
        self._supersede(item.id)
        self._running[item.id] = self._group.create_task(self._run_item(item))
        self.stats.started += 1
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))

    def _set_reserve_target(self, running: int) -> None:
        """Reserve for `running` slots as many items as they get through in the horizon."""
        if self._should_stop():
            self.store.reserve_target = self.store.reserve_depth = 0
            self.store.start_rate = 0.0
            return
        mean = self._mean_duration
        depth = 1 if mean is None else max(1, min(MAX_DEPTH, math.ceil(HANDOVER_HORIZON / max(mean, 1e-6))))
        self.store.reserve_target = depth * min(max(running, 0), self.parallel)
        self.store.reserve_depth = depth
        self.store.start_rate = 0.0 if mean is None else max(running, 0) / max(mean, 1e-6)

    def _successor(self) -> ClaimedItem | None:
        """The reserved item to start in the slot of one that just finished, if any may."""
        self._apply_share()
        if self._should_stop() or self._limiter.in_debt:
            return None
        slots = self._worker_slots
        if slots is not None and (slots.waiting > int(self._awaiting_worker_slot) or slots.in_debt):
            # Another batch of this worker waits for a slot: let it have this one, and give
            # back what this batch can no longer run soon, so that other workers may.
            self._set_reserve_target(len(self._running) - 1)
            if self._group is not None:
                self._group.create_task(self.store.trim(self.store.reserve_target))
            return None
        return self.store.take_reserved()

    def _drop_refused(self, item_ids: list[int]) -> None:
        """The database refused these handovers (their reservations were lost and may be
        another worker's now): stop their runs here, silently, as for a superseded item."""
        for item_id in item_ids:
            task = self._running.pop(item_id, None)
            if task is not None:
                logger.warning("handover refused; stopping the item here", extra={"item_id": item_id})
                self._superseded.add(task)
                task.cancel()

    def _should_stop(self) -> bool:
        return self.cancel_event.is_set() or self._stop_claiming.is_set()

    async def _acquire_slots(self) -> int:
        """Wait for one slot (of the batch and of the worker), then take what else is free."""
        await self._limiter.acquire()
        if self._worker_slots is not None:
            self._awaiting_worker_slot = True
            try:
                await self._worker_slots.acquire()
            except BaseException:
                self._limiter.release()
                raise
            finally:
                self._awaiting_worker_slot = False
        if self._should_stop():
            self._release_slot()
            return 0
        slots = 1
        while slots < MAX_CLAIM and self._limiter.try_acquire():
            if self._worker_slots is not None and not self._worker_slots.try_acquire():
                self._limiter.release()
                break
            slots += 1
        return slots

    def _release_slot(self) -> None:
        self._limiter.release()
        if self._worker_slots is not None:
            self._worker_slots.release()

    async def _wait_for_wakeup(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=self.idle_wait)

    # --- one item -----------------------------------------------------------------------

    async def _run_item(self, item: ClaimedItem) -> None:
        finished = False
        try:
            began = time.monotonic()
            outcome = await self._execute(item)
            self._observe(time.monotonic() - began)
            # A reserved successor takes the slot at once; its handover is queued before this
            # outcome, so both are written together. Otherwise the slot is free once the
            # outcome is queued: `complete` takes it before it first suspends, so the claim
            # this frees is written after it, in the same transaction.
            successor = self._successor()
            self._finish(item, keep_slot=successor is not None)
            finished = True
            try:
                if successor is not None:
                    self._start(successor)
            finally:
                # Written by the store's next step; the task ends now (`run` flushes at the end).
                self.store.enqueue([outcome])
        except asyncio.CancelledError:
            if not finished and asyncio.current_task() not in self._superseded:
                await asyncio.shield(self._settle_cancelled(item))
            raise
        finally:
            if not finished:
                self._finish(item)

    def _supersede(self, item_id: int) -> None:
        """An item we still run came back to us in a claim: its lease expired (renewals
        failed) and it was put back. The new attempt owns the row; stop the old one silently."""
        stale = self._running.pop(item_id, None)
        if stale is not None:
            logger.warning("item re-claimed while an older attempt ran here", extra={"item_id": item_id})
            self._superseded.add(stale)
            stale.cancel()

    def _finish(self, item: ClaimedItem, *, keep_slot: bool = False) -> None:
        if self._running.get(item.id) is asyncio.current_task():
            del self._running[item.id]
        self.stats.finished += 1
        if not keep_slot:
            self._release_slot()
            self._wakeup.set()

    def _observe(self, duration: float) -> None:
        mean = self._mean_duration
        self._mean_duration = duration if mean is None else mean + DURATION_WEIGHT * (duration - mean)
        self._set_reserve_target(len(self._running))

    async def _settle_cancelled(self, item: ClaimedItem) -> None:
        """Only a force cancel ends the item cancelled; any other cancellation of its task
        (shutdown, a crash of the run) gives it back as pending for a later attempt."""
        if self._forced:
            error = "Cancelled by force: the handler ignored cancellation past the drain deadline."
            await self.store.complete([Outcome(item.id, ItemStatus.CANCELLED, error=error)])
        else:
            await self.store.release([item.id])

    async def _execute(self, item: ClaimedItem) -> Outcome:
        ctx = ItemContext(
            batch_id=self.batch_id,
            item_id=item.id,
            index=item.index,
            attempt=item.attempt,
            cancel_event=self.cancel_event,
            _on_progress=self.on_progress,
        )
        try:
            if self.item_timeout is None:
                result = await self._call(item.params, ctx)
            else:
                deadline = asyncio.timeout(self.item_timeout)
                try:
                    async with deadline:
                        result = await self._call(item.params, ctx)
                except TimeoutError:
                    if not deadline.expired():
                        raise  # the handler's own TimeoutError, not the item timeout
                    return Outcome(item.id, ItemStatus.FAILED, error=f"Timed out after {self.item_timeout} s.")
        except ItemCancelled:
            return Outcome(item.id, ItemStatus.CANCELLED, error="Cancelled at a checkpoint.")
        except Exception as exc:
            logger.warning("item failed", exc_info=True, extra={"batch_id": str(self.batch_id), "index": item.index})
            # PostgreSQL text cannot hold NUL: escape it rather than lose the whole write.
            return Outcome(item.id, ItemStatus.FAILED, error=f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00"))
        if result is None:
            return Outcome(item.id, ItemStatus.SUCCEEDED)
        try:
            encoded = json.dumps(result, allow_nan=False)  # what PostgreSQL's jsonb accepts
        except (TypeError, ValueError) as exc:
            return Outcome(item.id, ItemStatus.FAILED, error=f"Result is not JSON serializable: {exc}")
        if "\\u0000" in encoded:
            return Outcome(item.id, ItemStatus.FAILED, error="Result contains a NUL character, which cannot be stored.")
        return Outcome(item.id, ItemStatus.SUCCEEDED, result=result)

    async def _call(self, params: dict[str, Any], ctx: ItemContext) -> Any:
        if self.handler.is_async:
            return await self.handler.call(params, ctx)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(self.handler.call_sync, params, ctx))
