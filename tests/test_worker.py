"""The real worker (in this process) against the real database: caps, cancel, failures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from batch import services
from batch.handlers import ItemContext, batch_handler
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.worker import Worker, WorkerConfig

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 30


class Probe:
    """Shared state of the test handlers below (one test at a time uses it)."""

    gate_at = 0
    running = 0
    peak = 0
    starts = 0
    gate: asyncio.Event | None = None
    started: asyncio.Event | None = None

    @classmethod
    def reset(cls, gate_at: int = 0) -> None:
        cls.gate_at, cls.running, cls.peak, cls.starts = gate_at, 0, 0, 0
        cls.gate, cls.started = asyncio.Event(), asyncio.Event()


@batch_handler("test.cap_probe")
async def cap_probe(params: dict[str, Any], ctx: ItemContext) -> None:
    """The first `gate_at` items wait for each other; each then yields so that anything the
    cap failed to hold back gets to start and be counted in the peak."""
    assert Probe.gate is not None
    Probe.running += 1
    Probe.peak = max(Probe.peak, Probe.running)
    if Probe.running >= Probe.gate_at:
        Probe.gate.set()
    await Probe.gate.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    Probe.running -= 1


@batch_handler("test.waits")
async def waits(params: dict[str, Any], ctx: ItemContext) -> None:
    """Counts starts, signals when `params['signal_at']` have started, then waits for cancel
    (cooperatively, or ignoring it when `stubborn`)."""
    assert Probe.started is not None
    Probe.starts += 1
    if Probe.starts >= params.get("signal_at", 1):
        Probe.started.set()
    if params.get("stubborn"):
        await asyncio.sleep(3600)
    await ctx.sleep(3600)


def config(**overrides: Any) -> WorkerConfig:
    base = {
        "worker_id": f"test-{uuid.uuid4().hex[:8]}",
        "handle_signals": False,
        "exit_when_idle": True,
        "poll_interval": 0.05,
        "heartbeat_seconds": 0.5,
    }
    return WorkerConfig.from_settings(**{**base, **overrides})


async def run_worker(**overrides: Any) -> Worker:
    worker = Worker(config(**overrides))
    await asyncio.wait_for(worker.run(), TIMEOUT)
    return worker


async def refreshed(batch: BatchJob) -> BatchJob:
    return await BatchJob.objects.aget(pk=batch.pk)


async def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


submit = sync_to_async(lambda **kw: services.submit_batch(**kw).batch)


@pytest.mark.parametrize(("max_parallel", "expected_peak"), [(8, 4), (2, 2)])
async def test_semaphore_cap_holds_exactly(settings: Any, max_parallel: int, expected_peak: int) -> None:
    """The load-bearing one: peak running = min(max_parallel, global cap 4), never more."""
    settings.BATCH_GLOBAL_MAX_PARALLEL = 4
    Probe.reset(gate_at=expected_peak)
    batch = await submit(handler="test.cap_probe", items=[{}] * 24, max_parallel=max_parallel)
    await run_worker(concurrency=16)
    batch = await refreshed(batch)
    assert Probe.peak == expected_peak
    assert (batch.status, batch.succeeded_items) == (BatchStatus.SUCCEEDED, 24)


async def test_cooperative_cancel_stops_running_items_and_starts_no_more() -> None:
    Probe.reset()
    batch = await submit(handler="test.waits", items=[{"signal_at": 2}] * 20, max_parallel=2)
    worker = asyncio.create_task(run_worker())
    assert Probe.started is not None
    await asyncio.wait_for(Probe.started.wait(), TIMEOUT)
    result = await sync_to_async(services.request_cancel)(batch_id=batch.id)
    assert result.batch is not None
    # The worker started 2 and holds 2 more (one per slot) to start next: those stay with
    # the worker, which gives them back cancelled; the other 16 pending are cancelled at once.
    assert (result.batch.status, result.batch.cancelled_items) == (BatchStatus.CANCELLING, 16)
    await asyncio.wait_for(worker, TIMEOUT)
    batch = await refreshed(batch)
    assert (batch.status, batch.cancelled_items, batch.running_items) == (BatchStatus.CANCELLED, 20, 0)
    assert Probe.starts == 2
    assert not await BatchJobItem.objects.filter(batch=batch, started_at__gt=batch.cancel_requested_at).aexists()


async def test_handler_ignoring_cancel_is_cancelled_by_force_after_the_drain(settings: Any) -> None:
    settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS = 0.5
    Probe.reset()
    batch = await submit(handler="test.waits", items=[{"stubborn": True}], max_parallel=1)
    worker = Worker(config(exit_when_idle=False, only_batch=batch.id))
    task = asyncio.create_task(worker.run())
    assert Probe.started is not None
    await asyncio.wait_for(Probe.started.wait(), TIMEOUT)
    await sync_to_async(services.request_cancel)(batch_id=batch.id)
    await wait_until(lambda: _cancel_seen(worker, batch.id))
    assert (await refreshed(batch)).status == BatchStatus.CANCELLING, "still draining: the handler ignores cancel"
    await asyncio.wait_for(task, TIMEOUT)
    batch = await refreshed(batch)
    assert (batch.status, batch.cancelled_items) == (BatchStatus.CANCELLED, 1)
    assert batch.finished_at is not None and batch.cancel_requested_at is not None
    assert (batch.finished_at - batch.cancel_requested_at).total_seconds() >= 0.5
    item = await BatchJobItem.objects.aget(batch=batch)
    assert "by force" in item.error


async def _cancel_seen(worker: Worker, batch_id: uuid.UUID) -> bool:
    runner = worker.runners.get(batch_id)
    return runner is not None and runner.cancel_event.is_set()


async def test_failing_items_fail_alone_and_the_batch_ends_failed() -> None:
    items = [{"seconds": 0, "fail": i % 4 == 0} for i in range(12)]
    batch = await submit(handler="demo.sleep", items=items, max_parallel=4)
    await run_worker()
    batch = await refreshed(batch)
    assert (batch.status, batch.succeeded_items, batch.failed_items) == (BatchStatus.FAILED, 9, 3)
    failed = await BatchJobItem.objects.aget(batch=batch, index=4)
    assert (failed.status, failed.error) == (ItemStatus.FAILED, "RuntimeError: demo.sleep was asked to fail")
    assert (await BatchJobItem.objects.aget(batch=batch, index=1)).result == {"slept": 0.0}


async def test_sync_forecast_handler_runs_in_the_pool() -> None:
    batch = await submit(
        handler="demo.forecast", items=[{"store": f"S{i}", "product": "P1", "horizon": 14} for i in range(6)]
    )
    await run_worker()
    batch = await refreshed(batch)
    assert (batch.status, batch.succeeded_items) == (BatchStatus.SUCCEEDED, 6)
    item = await BatchJobItem.objects.aget(batch=batch, index=0)
    assert len(item.result["forecast"]) == 14
    assert item.result["best_method"] in {"seasonal_naive", "moving_average"}


async def test_resize_reaches_a_running_batch(settings: Any) -> None:
    settings.BATCH_GLOBAL_MAX_PARALLEL = 4
    Probe.reset()
    batch = await submit(handler="test.waits", items=[{"signal_at": 1}] * 10, max_parallel=1)
    worker = Worker(config(exit_when_idle=False, only_batch=batch.id))
    task = asyncio.create_task(worker.run())
    assert Probe.started is not None
    await asyncio.wait_for(Probe.started.wait(), TIMEOUT)
    await sync_to_async(services.resize_batch)(batch_id=batch.id, max_parallel=3)
    await wait_until(lambda: _running_is(batch, 3))
    assert Probe.starts == 3
    await sync_to_async(services.request_cancel)(batch_id=batch.id)
    await asyncio.wait_for(task, TIMEOUT)


async def _running_is(batch: BatchJob, count: int) -> bool:
    return (await refreshed(batch)).running_items == count


async def test_stop_drains_then_gives_unfinished_items_back() -> None:
    Probe.reset()
    batch = await submit(handler="test.waits", items=[{"signal_at": 2, "stubborn": True}] * 5, max_parallel=2)
    worker = Worker(config(exit_when_idle=False, drain_timeout=0.2))
    task = asyncio.create_task(worker.run())
    assert Probe.started is not None
    await asyncio.wait_for(Probe.started.wait(), TIMEOUT)
    worker.stop()
    await asyncio.wait_for(task, TIMEOUT)
    batch = await refreshed(batch)
    assert (batch.status, batch.running_items, batch.pending_items) == (BatchStatus.RUNNING, 0, 5)
    assert not await BatchJobItem.objects.filter(batch=batch, attempts__gt=0).aexists()


async def test_a_signal_during_the_dispatch_query_starts_no_new_run() -> None:
    batch = await submit(handler="demo.noop", items=[{}] * 3)
    worker = Worker(config(exit_when_idle=False))
    worker.stop()
    async with asyncio.TaskGroup() as group:
        await worker._start(group, batch.id, "demo.noop", None)
    assert worker.runners == {}


async def test_worker_exits_even_when_it_cannot_unregister(monkeypatch: pytest.MonkeyPatch) -> None:
    """The database went away at shutdown: the worker still exits (its heartbeat goes stale)."""
    import threading

    from batch import worker as worker_module

    database_back = threading.Event()
    monkeypatch.setattr(worker_module, "UNREGISTER_TIMEOUT", 0.1)
    monkeypatch.setattr(services, "unregister_worker", lambda **kwargs: database_back.wait(TIMEOUT * 2))
    try:
        await run_worker()
        assert not database_back.is_set()
    finally:
        database_back.set()


async def test_a_cancel_notification_cancels_the_batch_run_at_once() -> None:
    """The payload names the batch: its runner stops launching without waiting for a read."""

    class Runner:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

        def wake(self) -> None:
            pass

    worker = Worker(config())
    mine, other = Runner(), Runner()
    batch_id = uuid.uuid4()
    worker.runners.update({batch_id: mine, uuid.uuid4(): other})  # type: ignore[dict-item]
    for payload in ("", "completed:" + str(batch_id), "cancel:not-a-uuid", f"cancel:{uuid.uuid4()}"):
        worker._on_control(payload)
    assert not mine.cancelled
    worker._on_control(f"cancel:{batch_id}")
    assert mine.cancelled and not other.cancelled


async def test_one_owners_batches_leave_room_for_another_owner(settings: Any, django_user_model: Any) -> None:
    """Four batches of 4 long items of one owner on a worker of 16 slots, under an owner cap
    of 12: another owner's batch starts while all twelve still run (none has to finish)."""
    settings.BATCH_MAX_RUNNING_PER_OWNER = 12
    alice = await django_user_model.objects.acreate(username="alice")
    bob = await django_user_model.objects.acreate(username="bob")
    Probe.reset()
    for _ in range(4):
        await submit(handler="test.waits", items=[{"signal_at": 12}] * 4, max_parallel=4, created_by=alice)
    worker = Worker(config(concurrency=16, exit_when_idle=False))
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(Probe.started.wait(), TIMEOUT)  # twelve of alice's run
        submitted = asyncio.get_running_loop().time()
        other = await submit(handler="test.waits", items=[{}], max_parallel=1, created_by=bob)

        async def bob_runs() -> bool:
            return await BatchJobItem.objects.filter(batch=other, status=ItemStatus.RUNNING).aexists()

        await wait_until(bob_runs)
        waited = asyncio.get_running_loop().time() - submitted
        running = await BatchJobItem.objects.filter(batch__created_by=alice, status=ItemStatus.RUNNING).acount()
        assert running == 12 and Probe.starts == 13, "bob's item started while alice's twelve still ran"
        print(f"bob's batch started {waited:.3f} s after its submit")
    finally:
        worker.stop()
        worker.stop()
        await asyncio.wait_for(run, TIMEOUT)


@batch_handler("test.first_waits")
async def first_waits(params: dict[str, Any], ctx: ItemContext) -> None:
    """The first item to start signals and waits for the gate; the others return at once."""
    assert Probe.started is not None and Probe.gate is not None
    Probe.starts += 1
    if Probe.starts == 1:
        Probe.started.set()
        await Probe.gate.wait()


async def test_a_run_that_fetched_nothing_while_paused_takes_its_items_up_again_on_resume() -> None:
    """Found by tests/test_lifecycle_cluster.py (1 run in 5 on PostgreSQL): a runner's fetch that
    lands while its batch is paused finds nothing, the store marks itself exhausted, the worker
    then asks for no permits for it after the resume, and the run waits for a slot forever."""
    Probe.reset()
    batch = await submit(handler="test.first_waits", items=[{}] * 6, max_parallel=1)
    worker = Worker(config(concurrency=2))
    task = asyncio.create_task(worker.run())
    assert Probe.started is not None and Probe.gate is not None
    await asyncio.wait_for(Probe.started.wait(), TIMEOUT)
    await sync_to_async(services.pause_batch)(batch_id=batch.pk)
    runner = worker.runners[batch.pk]
    await wait_until(lambda: _async_true(worker.permits[batch.pk].paused and runner.parallel == 0))
    await runner.store.refill()  # the runner's own top-up, landing while the batch is paused
    assert runner.store.exhausted
    Probe.gate.set()  # the running item finishes; nothing more may start while paused
    await wait_until(lambda: _running_is(batch, 0))
    await sync_to_async(services.resume_batch)(batch_id=batch.pk)
    await asyncio.wait_for(task, TIMEOUT)
    batch = await refreshed(batch)
    assert (batch.status, batch.succeeded_items, Probe.starts) == (BatchStatus.SUCCEEDED, 6, 6)


async def _async_true(value: bool) -> bool:
    return value
