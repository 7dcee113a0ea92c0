"""The only code that schedules item execution.

One `BatchRunner` per batch and worker: one resizable semaphore (`Limiter`, its capacity the
permits the database granted this worker) inside one `asyncio.TaskGroup`. Items are spawned
lazily as slots free, so memory is O(parallel), not O(items). Cancellation is cooperative
through the batch's `asyncio.Event`; past the batch's force deadline the item tasks are
cancelled, which stops async handlers and kills the process of a sync one. An item keeps its
slot until its handler has really stopped.

The runner knows nothing of Django: it takes its collaborators (a store that holds, writes and
releases items; a runner of sync handlers) as arguments, so tests drive it without a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from batch import metrics
from batch.handlers import HandlerSpec, ItemCancelled, ItemContext
from batch.models import ItemStatus
from batch.services import ClaimedItem, Outcome
from batch.slots import Limiter, WorkerSlots
from batch.sync_calls import HandlerTimeout, SyncCalls

logger = logging.getLogger(__name__)

HOLD_HORIZON = 0.02  # hold enough items to keep the slots busy this long without the database
MAX_HOLD = 512
RETRY_POLL_SECONDS = 0.25  # how often a run whose other items still run looks for retries come due
MAX_ERROR_LENGTH = 4000  # characters of a failed attempt's error kept (an item keeps up to five)


def storable_text(text: str) -> str:
    """`text` as both databases store it: NUL (PostgreSQL refuses it) and lone surrogates (not
    UTF-8: no database driver encodes them) escaped, rather than losing the whole write."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


class BatchStore(Protocol):
    """Persistence the runner needs; `batch.store.DatabaseStore` is the real one."""

    hold_target: int
    exhausted: bool
    on_refused: Callable[[list[int]], None]

    def take(self) -> ClaimedItem | None: ...
    def held_item_ids(self) -> list[int]: ...
    def enqueue(self, outcomes: list[Outcome]) -> None: ...
    async def complete(self, outcomes: list[Outcome]) -> None: ...
    async def refill(self) -> None: ...
    def trim(self, keep: int) -> None: ...
    async def close(self) -> None: ...
    async def flush(self) -> None: ...
    async def release(self, item_ids: list[int]) -> None: ...


@dataclass
class RunnerStats:
    started: int = 0
    finished: int = 0
    peak_running: int = 0


class BatchRunner:
    """Runs the items of one batch on this worker, at most `parallel` (its permits) at a time."""

    def __init__(
        self,
        *,
        batch_id: uuid.UUID,
        handler: HandlerSpec,
        store: BatchStore,
        parallel: int,
        sync_calls: SyncCalls,
        worker_slots: WorkerSlots | None = None,
        owner: Hashable = None,
        item_timeout: float | None = None,
        on_progress: Callable[[ItemContext], None] | None = None,
    ) -> None:
        self.batch_id = batch_id
        self.handler = handler
        self.store = store
        self.sync_calls = sync_calls
        self.item_timeout = item_timeout
        self.on_progress = on_progress
        self.owner = owner
        self.cancel_event = asyncio.Event()
        self.stats = RunnerStats()
        self._limiter = Limiter(parallel)
        self._worker_slots = worker_slots
        self._stop = asyncio.Event()  # launch nothing more (cancel, shutdown)
        self._running: dict[int, asyncio.Task[None]] = {}
        self._forced = False
        self._releasing = False
        self._mean_duration: float | None = None
        self._group: asyncio.TaskGroup | None = None
        self._releases: set[asyncio.Future[None]] = set()  # kept referenced until done
        self._metrics = metrics.for_handler(handler.name)
        store.on_refused = self._drop_refused
        self._set_hold_target()

    # --- control, called by the worker --------------------------------------------------

    @property
    def parallel(self) -> int:
        return self._limiter.capacity

    @property
    def running_item_ids(self) -> list[int]:
        return list(self._running)

    @property
    def leased_item_ids(self) -> list[int]:
        """Items whose leases this worker renews: running here, or held for it."""
        return [*self._running, *self.store.held_item_ids()]

    @property
    def holding(self) -> int:
        """The most items of the batch that may run here until the next grant arrives."""
        return max(len(self._running), self._limiter.capacity)

    @property
    def wants_more(self) -> bool:
        return not self._stop.is_set() and not (self.store.exhausted and not self.store.held_item_ids())

    def resize(self, parallel: int) -> None:
        """A new grant: run at most `parallel` items here (running ones are never interrupted)."""
        self._limiter.resize(parallel)
        self._set_hold_target()
        self.store.trim(self.store.hold_target)

    def cancel(self) -> None:
        """Cooperative: launch nothing more; running handlers see `ctx.cancelled`."""
        self.cancel_event.set()
        self._halt()

    def force_cancel(self) -> None:
        """Past the force deadline: stop the handlers (tasks cancelled, processes killed);
        their items end cancelled once they have really stopped."""
        self.cancel()
        if not self._forced:
            self._forced = True
            for task in self._running.values():
                task.cancel()

    def expect_items(self) -> None:
        """The batch was resumed: a fetch while it was paused found nothing, which said nothing
        of its items; want permits and fetch again."""
        self.store.exhausted = False

    def stop_claiming(self) -> None:
        """Graceful shutdown: launch nothing more, let running items finish."""
        self._halt()

    def _halt(self) -> None:
        """Launch nothing more; the held items go back in the next write (with a cancel, the
        same write as the outcomes of the items that stop, so the batch can end at once)."""
        self._stop.set()
        self._limiter.interrupt()
        self.store.hold_target = 0
        self.store.trim(0)

    def abort(self) -> None:
        """Shutdown past its drain: stop the running items and give them back as pending."""
        self.stop_claiming()
        self._releasing = True
        for task in self._running.values():
            task.cancel()

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Start items as slots free until none is left or the run stops, then wait for the
        running ones; the held items go back."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                while await self._acquire_slot():
                    item = self.store.take()
                    if item is None:
                        await self.store.refill()
                        item = self.store.take()
                    if item is None:
                        self._release_slot()
                        if self.store.exhausted and not await self._await_due_retries():
                            break
                        continue
                    self._start(group, item)
        finally:
            await asyncio.shield(self.store.close())

    async def _await_due_retries(self) -> bool:
        """Nothing startable is left, but with a `Retry` policy some pending items may be waiting
        out a backoff: while items of the batch still run here (the run stays, and the dispatch
        loop would not take the batch up again), look again every RETRY_POLL_SECONDS, holding no
        slot and wanting no permit meanwhile. True once something is held to start."""
        if self.handler.retry is None:
            return False
        while self._running and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RETRY_POLL_SECONDS)
            if self._stop.is_set():
                return False
            await self.store.refill()
            if self.store.held_item_ids():
                return True
        return False

    async def _acquire_slot(self) -> bool:
        """A slot of the batch's and one of the worker's; False once the run stops."""
        if not await self._limiter.acquire(self._stop):
            return False
        if self._worker_slots is not None and not await self._worker_slots.acquire(self.owner, self._stop):
            self._limiter.release()
            return False
        if self._stop.is_set():
            self._release_slot()
            return False
        return True

    def _release_slot(self) -> None:
        self._limiter.release()
        if self._worker_slots is not None:
            self._worker_slots.release(self.owner)

    def _start(self, group: asyncio.TaskGroup, item: ClaimedItem) -> None:
        self._running[item.id] = group.create_task(self._run_item(item))
        self.stats.started += 1
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))

    def _set_hold_target(self) -> None:
        """Hold as many items as the slots get through in HOLD_HORIZON (all the slots at first)."""
        mean, slots = self._mean_duration, self._limiter.capacity
        wanted = slots if mean is None else math.ceil(slots * HOLD_HORIZON / max(mean, 1e-6))
        self.store.hold_target = 0 if self._stop.is_set() else min(MAX_HOLD, wanted)

    def _drop_refused(self, item_ids: list[int]) -> None:
        """The database refused these starts (the items' leases were lost and may be another
        worker's now): stop their runs here, silently."""
        for item_id in item_ids:
            task = self._running.pop(item_id, None)
            if task is not None:
                logger.warning("start refused; stopping the item here", extra={"item_id": item_id})
                task.cancel()

    # --- one item -----------------------------------------------------------------------

    async def _run_item(self, item: ClaimedItem) -> None:
        try:
            began = time.monotonic()
            outcome = await self._execute(item)
            duration = time.monotonic() - began
            self._metrics.finished(metrics.RETRIED if outcome.retry_in is not None else outcome.status, duration)
            self._mean_duration = (
                duration if self._mean_duration is None else 0.8 * self._mean_duration + 0.2 * duration
            )
            self._set_hold_target()
            self.store.enqueue([outcome])  # before the slot frees: written no later than its successor's start
        except asyncio.CancelledError:
            if self._running.get(item.id) is asyncio.current_task():  # not refused
                await asyncio.shield(self._settle_cancelled(item))
            raise
        finally:
            if self._running.get(item.id) is asyncio.current_task():
                del self._running[item.id]
            self.stats.finished += 1
            if not self._pass_slot_on():
                self._release_slot()

    def _pass_slot_on(self) -> bool:
        """Start the next held item in the slot just freed, without a wake-up of the loop: only
        while the batch goes on within its permits and no other batch here waits for a slot."""
        waiting = self._worker_slots is not None and self._worker_slots.waiting
        if self._group is None or self._stop.is_set() or waiting or self._limiter.in_use > self._limiter.capacity:
            return False
        successor = self.store.take()
        if successor is None:
            return False
        try:
            self._start(self._group, successor)
        except RuntimeError:  # the group is shutting down (the run failed): the item goes back
            release = asyncio.ensure_future(self.store.release([successor.id]))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
            return False
        return True

    async def _settle_cancelled(self, item: ClaimedItem) -> None:
        """A force cancel ends the item cancelled; any other cancellation of its task
        (shutdown, a crash of the run) gives it back as pending for a later attempt."""
        if self._forced and not self._releasing:
            error = "Cancelled by force: the handler ignored cancellation past the drain deadline."
            self._metrics.finished(ItemStatus.CANCELLED)
            await self.store.complete([Outcome(item.id, ItemStatus.CANCELLED, error=error, attempt=item.attempt)])
        else:
            await self.store.release([item.id])

    async def _execute(self, item: ClaimedItem) -> Outcome:
        try:
            result = await self._call(item)
        except ItemCancelled:
            return Outcome(item.id, ItemStatus.CANCELLED, error="Cancelled at a checkpoint.", attempt=item.attempt)
        except HandlerTimeout as exc:
            return self._failure(item, exc, f"Timed out after {exc.seconds} s.")
        except Exception as exc:
            logger.warning("item failed", exc_info=True, extra={"batch_id": str(self.batch_id), "index": item.index})
            return self._failure(item, exc, storable_text(f"{type(exc).__name__}: {exc}"))
        if result is None:
            return Outcome(item.id, ItemStatus.SUCCEEDED, attempt=item.attempt)
        try:
            encoded = json.dumps(result, allow_nan=False)  # what PostgreSQL's jsonb accepts
        except (TypeError, ValueError) as exc:
            return Outcome(
                item.id, ItemStatus.FAILED, error=f"Result is not JSON serializable: {exc}", attempt=item.attempt
            )
        if "\\u0000" in encoded:
            return Outcome(
                item.id,
                ItemStatus.FAILED,
                error="Result contains a NUL character, which cannot be stored.",
                attempt=item.attempt,
            )
        return Outcome(item.id, ItemStatus.SUCCEEDED, result=result, attempt=item.attempt)

    def _failure(self, item: ClaimedItem, exc: BaseException, error: str) -> Outcome:
        """A failed attempt: tried again after a backoff if the handler's `Retry` covers the
        error and the batch allows another attempt, failed otherwise."""
        if len(error) > MAX_ERROR_LENGTH:  # kept up to ERRORS_KEPT times: bounded
            error = error[:MAX_ERROR_LENGTH] + " … (truncated)"
        policy = self.handler.retry
        if policy is None or item.attempt >= item.max_attempts or not policy.applies_to(exc):
            return Outcome(item.id, ItemStatus.FAILED, error=error, attempt=item.attempt)
        return Outcome(
            item.id, ItemStatus.PENDING, error=error, retry_in=policy.delay(item.attempt), attempt=item.attempt
        )

    async def _call(self, item: ClaimedItem) -> Any:
        """Run the handler; an item timeout counts from the moment the handler starts."""
        if not self.handler.is_async:
            return await self.sync_calls.call(
                handler=self.handler,
                params=item.params,
                batch_id=self.batch_id,
                item_id=item.id,
                index=item.index,
                attempt=item.attempt,
                cancel_event=self.cancel_event,
                on_progress=self._progress_callback(item),
                item_timeout=self.item_timeout,
            )
        ctx = self._context(item)
        ctx._on_progress = self.on_progress
        if self.item_timeout is None:
            return await self.handler.call(params=item.params, ctx=ctx)
        deadline = asyncio.timeout(self.item_timeout)
        try:
            async with deadline:
                return await self.handler.call(params=item.params, ctx=ctx)
        except TimeoutError:
            if deadline.expired():
                raise HandlerTimeout(self.item_timeout) from None
            raise  # the handler's own TimeoutError, not the item timeout

    def _progress_callback(self, item: ClaimedItem) -> Callable[[float, str], None] | None:
        if self.on_progress is None:
            return None
        report = self.on_progress
        ctx = self._context(item)

        def on_progress(fraction: float, message: str) -> None:
            ctx.progress_fraction, ctx.progress_message = fraction, message
            report(ctx)

        return on_progress

    def _context(self, item: ClaimedItem) -> ItemContext:
        return ItemContext(
            batch_id=self.batch_id,
            item_id=item.id,
            index=item.index,
            attempt=item.attempt,
            cancel_event=self.cancel_event,
        )
