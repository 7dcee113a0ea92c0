"""The real worker (in this process) on a paused batch: it starts nothing while paused, then resumes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async

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
