"""The real worker (in this process) and the lifecycle: pause and resume, the failure threshold, the deadline."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from batch import selectors, services
from batch.handlers import ItemContext, batch_handler
from batch.models import AuditAction, BatchAuditEvent, BatchJob, BatchJobItem, BatchStatus
from batch.worker import Worker
from tests.test_worker import TIMEOUT, config, refreshed, submit, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


class Gate:
    starts = 0
    gate: asyncio.Event | None = None

    @classmethod
    def reset(cls) -> None:
        cls.starts, cls.gate = 0, asyncio.Event()


@batch_handler("test.gated")
async def gated(params: dict[str, Any], ctx: ItemContext) -> None:
    assert Gate.gate is not None
    Gate.starts += 1
    await Gate.gate.wait()


class Ticks:
    """The worker's observer: counts watch ticks (each one reads the batch and syncs if due)."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, worker: Worker, *, final: bool = False) -> None:
        self.count += 1


async def test_a_paused_batch_starts_nothing_on_the_worker_until_it_is_resumed() -> None:
    Gate.reset()
    assert Gate.gate is not None
    batch = await submit(handler="test.gated", items=[{}] * 6, max_parallel=2)
    ticks = Ticks()
    worker = Worker(config(exit_when_idle=False, only_batch=batch.id, heartbeat_seconds=0.2), observer=ticks)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: _async_true(Gate.starts == 2))
    await sync_to_async(services.pause_batch)(batch_id=batch.id)
    await wait_until(lambda: _async_true(_granted_nothing(worker, batch)))  # the grant of 0 has arrived
    Gate.gate.set()  # the two running items finish
    await wait_until(lambda: _settled(batch))
    seen = ticks.count
    await wait_until(lambda: _async_true(ticks.count >= seen + 5))  # several watch ticks while paused
    paused = await refreshed(batch)
    assert (paused.status, paused.succeeded_items, paused.running_items, Gate.starts) == (BatchStatus.PAUSED, 2, 0, 2)
    assert not await BatchJobItem.objects.filter(batch=batch).exclude(lease_owner="").aexists(), "held items go back"
    await sync_to_async(services.resume_batch)(batch_id=batch.id)
    await asyncio.wait_for(task, TIMEOUT)
    done = await refreshed(batch)
    assert (done.status, done.succeeded_items, Gate.starts) == (BatchStatus.SUCCEEDED, 6, 6)
    resumed_at = (await BatchAuditEvent.objects.aget(batch=batch, action=AuditAction.RESUMED)).at
    late = BatchJobItem.objects.filter(batch=batch, started_at__gte=resumed_at)
    assert await late.acount() == 4, "the other four started only after the resume"


async def _async_true(value: bool) -> bool:
    return value


def _granted_nothing(worker: Worker, batch: BatchJob) -> bool:
    runner = worker.runners.get(batch.id)
    return runner is None or (runner.parallel == 0 and not runner.store.held_item_ids())


async def _settled(batch: BatchJob) -> bool:
    return await sync_to_async(selectors.pause_settled)(await refreshed(batch))


async def test_the_failure_threshold_stops_a_batch_on_a_real_worker_and_it_ends_failed() -> None:
    """Three items fail, the rest would wait for an hour unless the batch is stopped."""
    Gate.reset()
    items = [{"fail": True}] * 3 + [{}] * 10
    batch = await submit(handler="test.until_cancelled", items=items, max_parallel=2, max_failures=3)
    worker = Worker(config(exit_when_idle=False, only_batch=batch.id))
    await asyncio.wait_for(worker.run(), TIMEOUT)
    done = await refreshed(batch)
    assert (done.status, done.status_reason) == (BatchStatus.FAILED, "failure threshold")
    assert (done.failed_items, done.cancelled_items, done.succeeded_items) == (3, 10, 0)
    assert done.finished_at is not None


async def test_a_deadline_cancels_a_running_batch_on_a_real_worker() -> None:
    Gate.reset()
    batch = await submit(handler="test.until_cancelled", items=[{}] * 4, max_parallel=2, deadline_seconds=1)
    worker = Worker(config(exit_when_idle=False, only_batch=batch.id))
    await asyncio.wait_for(worker.run(), TIMEOUT)
    done = await refreshed(batch)
    assert (done.status, done.status_reason, done.cancelled_items) == (BatchStatus.CANCELLED, "deadline", 4)
    assert done.started_at is not None and done.cancel_requested_at is not None
    assert (done.cancel_requested_at - done.started_at).total_seconds() >= 1
    assert Gate.starts == 2


async def test_a_deadline_cancels_a_paused_batch_nobody_runs_at_the_heartbeat() -> None:
    batch = await submit(handler="demo.noop", items=[{}] * 3, deadline_seconds=5)
    await sync_to_async(services.pause_batch)(batch_id=batch.id)
    await BatchJob.objects.filter(pk=batch.pk).aupdate(started_at=timezone.now() - timedelta(seconds=10))
    worker = Worker(config(exit_when_idle=False, only_batch=batch.id))
    await asyncio.wait_for(worker.run(), TIMEOUT)  # it exits once the batch has finished
    done = await refreshed(batch)
    assert (done.status, done.status_reason, done.cancelled_items) == (BatchStatus.CANCELLED, "deadline", 3)
    assert not worker.runners


@batch_handler("test.until_cancelled")
async def until_cancelled(params: dict[str, Any], ctx: ItemContext) -> None:
    """Fails at once with `fail`; otherwise waits (cooperatively) until its batch is stopped."""
    Gate.starts += 1
    if params.get("fail"):
        raise RuntimeError("asked to fail")
    await ctx.sleep(3600)
