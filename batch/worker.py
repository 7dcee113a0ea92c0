"""The long-running loop behind `manage.py runbatch`.

It finds runnable batches and hands each to a `BatchRunner`, keeps the leases of its running
items alive, takes back items of workers that died, applies cancel and resize requests made
by any process (PostgreSQL notifications wake it at once; polling the database is the
fallback that always works), and shuts down in two stages: the first SIGINT/SIGTERM stops
claiming and lets running items finish within the drain timeout, then gives the rest back;
a second signal gives them back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from django.conf import settings

from batch import metrics, permit_sync, selectors, services
from batch.callbacks_delivery import CallbackSender
from batch.handlers import HandlerSpec, UnknownHandler, get_handler
from batch.models import TERMINAL_BATCH_STATUSES, BatchStatus, StatusReason
from batch.notify import listen_for_control
from batch.permit_sync import PermitState
from batch.runner import BatchRunner
from batch.slots import WorkerSlots
from batch.store import DatabaseStore, call_db
from batch.sync_calls import SyncCalls, sync_calls_for_worker

logger = logging.getLogger(__name__)

ABORT_GRACE_SECONDS = 10.0  # after giving items back, how long runs may take to wind down
UNREGISTER_TIMEOUT = 5.0
# Without a renewal for this share of the lease, a worker stops its items itself: by the time
# the lease expires (by the database's clock) and another worker may take them, they are stopped.
LOST_LEASE_SHARE = 0.8


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    concurrency: int
    poll_interval: float
    lease_seconds: float
    heartbeat_seconds: float
    drain_timeout: float
    item_timeout: float | None
    only_batch: uuid.UUID | None = None
    exit_when_idle: bool = False
    handle_signals: bool = True
    summary_interval: float = 60.0  # seconds between summary log lines; 0 turns them off

    @classmethod
    def from_settings(cls, **overrides: Any) -> WorkerConfig:
        config = cls(
            worker_id=f"{socket.gethostname()}-{os.getpid()}",
            concurrency=settings.BATCH_WORKER_CONCURRENCY,
            poll_interval=settings.BATCH_POLL_INTERVAL_SECONDS,
            lease_seconds=settings.BATCH_LEASE_SECONDS,
            heartbeat_seconds=settings.BATCH_HEARTBEAT_SECONDS,
            drain_timeout=settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS,
            item_timeout=settings.BATCH_ITEM_TIMEOUT_SECONDS or None,
            summary_interval=settings.BATCH_LOG_SUMMARY_SECONDS,
        )
        return replace(config, **{key: value for key, value in overrides.items() if value is not None})


class Observer(Protocol):
    """Called on every watch tick, and once more with final=True when the worker stops."""

    def __call__(self, worker: Worker, *, final: bool = False) -> Awaitable[None]: ...


class Worker:
    def __init__(self, config: WorkerConfig, *, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer
        self.runners: dict[uuid.UUID, BatchRunner] = {}
        self._runner_tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.slots = WorkerSlots(config.concurrency)
        self.sync_calls: SyncCalls = sync_calls_for_worker(config.concurrency)
        self.permits: dict[uuid.UUID, PermitState] = {}
        self._last_renewal = time.monotonic()
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()
        self._wakeup = asyncio.Event()  # the dispatch loop's
        self._watch_wakeup = asyncio.Event()
        self._signals = 0
        self._unknown_handlers: set[uuid.UUID] = set()
        self._finished_by_ended_runs = 0
        self.callbacks = CallbackSender(worker_id=config.worker_id)

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Work until stopped (signal, `stop()`, or idle with `exit_when_idle`/`only_batch`)."""
        config = self.config
        await call_db(
            services.register_worker,
            worker_id=config.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            concurrency=config.concurrency,
            lease_seconds=config.lease_seconds,
        )
        logger.info("worker started", extra={"worker_id": config.worker_id, "concurrency": config.concurrency})
        if config.handle_signals:
            self._install_signal_handlers()
        metrics.track_worker(self)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat_loop())
                group.create_task(self._watch_loop())
                group.create_task(self._summary_loop())
                group.create_task(self._lease_guard_loop())
                group.create_task(listen_for_control(self._on_control, self._closed))
                group.create_task(self.callbacks.run(self._closed))
                await self._dispatch_loop(group)
                await self._drain()
                self._closed.set()
            if self.observer is not None:
                await self.observer(self, final=True)
        finally:
            metrics.untrack_worker(self)
            await self.sync_calls.close()
            try:  # bounded: with the database down, exit anyway (the heartbeat just goes stale)
                await asyncio.wait_for(
                    call_db(services.unregister_worker, worker_id=config.worker_id), UNREGISTER_TIMEOUT
                )
            except TimeoutError:
                logger.warning("could not unregister the worker", extra={"worker_id": config.worker_id})
            logger.info("worker stopped", extra={"worker_id": config.worker_id})

    def stop(self) -> None:
        """First call: stop claiming and drain. Second call: give running items back now."""
        self._signals += 1
        self._stopping.set()
        for runner in self.runners.values():
            if self._signals == 1:
                runner.stop_claiming()
            else:
                runner.abort()
        self.wake()

    def _on_control(self, payload: str) -> None:
        """A control notification. A cancel is acted on at once: it is only sent by a cancel
        request's own transaction, on commit, so the batch is cancelling by now; the watch
        loop's read confirms it anyway."""
        kind, _, batch_id = payload.partition(":")
        with contextlib.suppress(ValueError):
            key = uuid.UUID(batch_id)
            runner, state = self.runners.get(key), self.permits.get(key)
            if kind == "cancel" and runner is not None:
                runner.cancel()
            if state is not None and kind in ("cancel", "resize", "permits", "pause", "resume"):
                state.resync = True
        # A batch may have ended (with a webhook to send): a step, a cancel, a release or a
        # recovery ends batches; "" is a reconnect.
        if kind in ("completed", "cancel", "released", "recovered", ""):
            self.callbacks.wake()
        self.wake()

    def wake(self) -> None:
        """A control notification (or a local change): look at the database again now."""
        self._wakeup.set()
        self._watch_wakeup.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        logger.info("received %s", signal.Signals(signum).name, extra={"worker_id": self.config.worker_id})
        self.stop()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        self._wakeup.clear()

    # --- finding and running batches ----------------------------------------------------

    async def _dispatch_loop(self, group: asyncio.TaskGroup) -> None:
        config = self.config
        while not self._stopping.is_set():
            try:
                if await self._dispatch_once(group):
                    return
            except Exception:
                logger.exception("finding batches failed; retrying", extra={"worker_id": config.worker_id})
            await self._sleep(config.poll_interval)

    async def _dispatch_once(self, group: asyncio.TaskGroup) -> bool:
        """Start runners for new runnable batches; True when the worker should exit idle."""
        exclude = [*self.runners, *self._unknown_handlers]
        found = await call_db(selectors.runnable_batches, exclude=exclude, only=self.config.only_batch)
        for batch_id, handler_name, owner in found:
            await self._start(group, batch_id, handler_name, owner)
        return not self.runners and not found and await self._idle_exit()

    async def _idle_exit(self) -> bool:
        if self.config.exit_when_idle:  # idle: nothing runnable, and no retry waiting out its backoff
            return not await call_db(selectors.retries_waiting, only=self.config.only_batch)
        if self.config.only_batch is None:
            return False
        states = await call_db(selectors.batch_states, [self.config.only_batch])
        state = states.get(self.config.only_batch)
        return state is None or state.status in TERMINAL_BATCH_STATUSES

    async def _start(self, group: asyncio.TaskGroup, batch_id: uuid.UUID, handler_name: str, owner: Any) -> None:
        if self._stopping.is_set():  # a signal came while the query ran: start nothing new
            return
        try:
            handler = get_handler(handler_name)
        except UnknownHandler:
            logger.error(
                "no handler %r in this worker; skipping batch", handler_name, extra={"batch_id": str(batch_id)}
            )
            self._unknown_handlers.add(batch_id)
            return
        runner = self._runner(batch_id, handler, owner)
        self.runners[batch_id] = runner
        self.permits[batch_id] = PermitState(resync=True)
        await self._sync_permits([batch_id])
        self._runner_tasks[batch_id] = group.create_task(self._run_batch(runner))

    def _runner(self, batch_id: uuid.UUID, handler: HandlerSpec, owner: Any) -> BatchRunner:
        return BatchRunner(
            batch_id=batch_id,
            handler=handler,
            store=DatabaseStore(
                batch_id=batch_id, worker_id=self.config.worker_id, lease_seconds=self.config.lease_seconds
            ),
            parallel=0,  # until the first grant
            sync_calls=self.sync_calls,
            worker_slots=self.slots,
            owner=owner,
            item_timeout=self.config.item_timeout,
        )

    async def _run_batch(self, runner: BatchRunner) -> None:
        logger.info("batch run started", extra={"batch_id": str(runner.batch_id), "parallel": runner.parallel})
        try:
            await runner.run()
        except Exception:
            logger.exception("batch run crashed; it will be picked up again", extra={"batch_id": str(runner.batch_id)})
        finally:
            del self.runners[runner.batch_id]
            del self._runner_tasks[runner.batch_id]
            self.permits.pop(runner.batch_id, None)
            with contextlib.suppress(Exception):  # else they lapse with the lease
                await asyncio.wait_for(
                    call_db(services.release_permits, worker_id=self.config.worker_id, batch_id=runner.batch_id),
                    UNREGISTER_TIMEOUT,
                )
            self._finished_by_ended_runs += runner.stats.finished
            self.wake()
        logger.info(
            "batch run ended",
            extra={
                "batch_id": str(runner.batch_id),
                "started": runner.stats.started,
                "peak": runner.stats.peak_running,
            },
        )

    async def _drain(self) -> None:
        """Wait for the running items up to the drain timeout, then give the rest back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while self.runners and loop.time() < deadline and self._signals < 2:
            await self._sleep(min(0.1, max(deadline - loop.time(), 0)))
        for runner in self.runners.values():
            runner.abort()
        abort_deadline = loop.time() + ABORT_GRACE_SECONDS
        while self.runners and loop.time() < abort_deadline:
            await self._sleep(0.05)
        for task in self._runner_tasks.values():  # stuck (e.g. database down): cancel the runs
            task.cancel()

    # --- watching: cancel, resize, deadlines, leases ------------------------------------

    async def _watch_loop(self) -> None:
        while not self._closed.is_set():
            try:
                if self.runners:
                    await self._apply_batch_states()
                if self.observer is not None:
                    await self.observer(self)
            except Exception:
                logger.exception("watching batches failed; retrying", extra={"worker_id": self.config.worker_id})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watch_wakeup.wait(), timeout=self.config.poll_interval)
            self._watch_wakeup.clear()

    async def _apply_batch_states(self) -> None:
        # Only the batches asked about: a runner started while the query ran is not in `states`,
        # and taking its absence for "deleted" would cancel a batch nobody cancelled.
        asked = list(self.runners)
        states = await call_db(selectors.batch_states, asked)
        for batch_id in asked:
            runner, state, permits = self.runners.get(batch_id), states.get(batch_id), self.permits.get(batch_id)
            if runner is None or permits is None:
                continue
            if state is None or state.status == BatchStatus.CANCELLING or state.status in TERMINAL_BATCH_STATUSES:
                runner.cancel()
            if state is not None and state.deadline_due:  # stop it now, not at the next heartbeat
                await call_db(services.request_cancel, batch_id=batch_id, reason=StatusReason.DEADLINE)
                runner.cancel()
            if state is not None and state.force_due:
                runner.force_cancel()
            if state is not None and state.effective_parallel != permits.effective_parallel:
                permits.effective_parallel, permits.resync = state.effective_parallel, True
            if state is not None and (state.status == BatchStatus.PAUSED) != permits.paused:
                permits.paused, permits.resync = state.status == BatchStatus.PAUSED, True
                if not permits.paused:
                    runner.expect_items()
            if not (permits.paused or permits.allowed or runner.wants_more or runner.running_item_ids):
                runner.stop_claiming()  # nothing to run, no permit to run it with: the run ends
        await self._sync_permits([batch_id for batch_id in asked if self._sync_due(batch_id)])

    def _sync_due(self, batch_id: uuid.UUID) -> bool:
        runner, state = self.runners.get(batch_id), self.permits.get(batch_id)
        return runner is not None and state is not None and permit_sync.due(self.config, self.permits, runner, state)

    async def _sync_permits(self, batch_ids: list[uuid.UUID]) -> None:
        await permit_sync.sync(self.config, self.permits, self.runners, batch_ids)

    async def _lease_guard_loop(self) -> None:
        """Renewals have failed for most of a lease (the database is unreachable): stop every
        item here before another worker may take it (the database's clock ends the lease; ours
        only comes earlier). Touches no database, so it runs while every call retries."""
        while not self._closed.is_set():
            await self._sleep_unless_closed(min(1.0, self.config.heartbeat_seconds))
            if time.monotonic() - self._last_renewal < LOST_LEASE_SHARE * self.config.lease_seconds:
                continue
            for runner in self.runners.values():
                if runner.running_item_ids:
                    logger.error("leases not renewed in time; stopping items", extra={"batch_id": str(runner.batch_id)})
                    runner.abort()

    async def _heartbeat_loop(self) -> None:
        while not self._closed.is_set():
            try:
                await self._heartbeat_once()
            except Exception:
                logger.exception("lease renewal failed; retrying", extra={"worker_id": self.config.worker_id})
            await self._sleep_unless_closed(self.config.heartbeat_seconds)

    async def _heartbeat_once(self) -> None:
        running = [item_id for runner in self.runners.values() for item_id in runner.leased_item_ids]
        sent = time.monotonic()
        await call_db(
            services.renew_leases,
            worker_id=self.config.worker_id,
            item_ids=running,
            lease_seconds=self.config.lease_seconds,
        )
        self._last_renewal = sent
        metrics.count_recoveries(await call_db(services.recover_expired_leases))
        await call_db(services.enforce_deadlines)  # also of batches nobody runs

    async def _sleep_unless_closed(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout=seconds)

    # --- operations ---------------------------------------------------------------------

    @property
    def finished_items(self) -> int:
        """Items this worker has finished (any outcome) since it started."""
        return self._finished_by_ended_runs + sum(runner.stats.finished for runner in self.runners.values())

    async def _summary_loop(self) -> None:
        """One `worker summary` log line per interval: what runs here and how fast."""
        interval = self.config.summary_interval
        if interval <= 0:
            return
        loop = asyncio.get_running_loop()
        last_at, last_finished = loop.time(), self.finished_items
        while not self._closed.is_set():
            await self._sleep_unless_closed(interval)
            now, finished = loop.time(), self.finished_items
            logger.info(
                "worker summary",
                extra={
                    "worker_id": self.config.worker_id,
                    "batches": len(self.runners),
                    "running": sum(len(runner.running_item_ids) for runner in self.runners.values()),
                    "finished": finished - last_finished,
                    "items_per_s": round((finished - last_finished) / max(now - last_at, 1e-9), 1),
                    "concurrency": self.config.concurrency,
                },
            )
            last_at, last_finished = now, finished
