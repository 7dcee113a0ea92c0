"""Races of reservations and handovers found in review: runner + DatabaseStore against the real database."""

from __future__ import annotations

import asyncio
import collections
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from batch import selectors, services
from batch.handlers import HandlerSpec, ItemContext
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.runner import BatchRunner, Limiter
from batch.services import Outcome
from batch.store import DatabaseStore

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 20

submit = sync_to_async(lambda **kw: services.submit_batch(**kw).batch)
step = sync_to_async(services.complete_and_claim)


def spec(func: Any) -> HandlerSpec:
    return HandlerSpec(name="test", func=func, params=None, is_async=True, description="")


def runner(batch: BatchJob, func: Any, *, worker: str = "wA", parallel: int = 1, **kw: Any) -> BatchRunner:
    store = DatabaseStore(batch_id=batch.id, worker_id=worker, lease_seconds=30)
    return BatchRunner(
        batch_id=batch.id,
        handler=spec(func),
        store=store,
        parallel=parallel,
        executor=ThreadPoolExecutor(1),
        idle_wait=0.05,
        **kw,
    )


async def item(pk: int) -> BatchJobItem:
    return await BatchJobItem.objects.aget(pk=pk)


async def until(pred: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.01)


@sync_to_async
def lose_reservation(item_id: int) -> None:
    """The worker's renewals did not get through (DB stall > lease): recovery clears it."""
    BatchJobItem.objects.filter(pk=item_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    services.recover_expired_leases()


async def test_a_refused_handover_stops_its_run_and_the_cap_holds() -> None:
    """wA's reservation expired (renewals stalled) and wB took it: wA's handover of it is
    refused, wA stops that run, and only wB runs the item; the database never counts more
    than the cap."""
    batch = await submit(handler="demo.noop", items=[{"i": i} for i in range(3)], max_parallel=1)
    gates = {i: asyncio.Event() for i in range(3)}
    started = {i: asyncio.Event() for i in range(3)}
    executing: collections.Counter[int] = collections.Counter()

    async def handler(params: dict[str, Any], ctx: ItemContext) -> None:
        i = params["i"]
        executing[i] += 1
        try:
            started[i].set()
            await gates[i].wait()
        finally:
            executing[i] -= 1

    r = runner(batch, handler)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(started[0].wait(), TIMEOUT)
    (item1,) = r.store.reserved_item_ids()
    await lose_reservation(item1)
    taken = await step(batch_id=batch.id, worker_id="wB", outcomes=(), claim_limit=0, lease_seconds=30, reserve_limit=1)
    assert [i.id for i in taken.reserved] == [item1]
    gates[0].set()  # item 0 finishes; wA hands its lost reservation over, and learns it was refused
    await asyncio.wait_for(started[1].wait(), TIMEOUT)
    await until(lambda: _settled(executing, 1))  # wA stopped its run of item 1
    await asyncio.wait_for(started[2].wait(), TIMEOUT)  # and its free slot claimed item 2
    db = await BatchJob.objects.aget(pk=batch.pk)
    assert (db.running_items, db.succeeded_items) == (1, 1) == (sum(executing.values()), 1)
    gates[2].set()
    await until(lambda: _status_is(batch.id, 2, ItemStatus.SUCCEEDED))
    claim = await step(batch_id=batch.id, worker_id="wB", outcomes=(), claim_limit=1, lease_seconds=30, promote=[item1])
    assert [i.id for i in claim.items] == [item1], "item 1 is wB's to run"
    assert executing[1] == 0, "and it runs on wB only"
    done = [Outcome(item1, ItemStatus.SUCCEEDED)]
    await step(batch_id=batch.id, worker_id="wB", outcomes=done, claim_limit=0, lease_seconds=30)
    await asyncio.wait_for(task, TIMEOUT)
    final = await BatchJob.objects.aget(pk=batch.pk)
    assert (final.status, final.succeeded_items, final.running_items) == (BatchStatus.SUCCEEDED, 3, 0)


async def test_a_refused_item_re_reserved_in_the_same_step_never_runs_twice_at_once() -> None:
    batch = await submit(handler="demo.noop", items=[{"i": i} for i in range(3)], max_parallel=1)
    gate0, started0 = asyncio.Event(), asyncio.Event()
    calls: collections.Counter[int] = collections.Counter()
    executing: collections.Counter[int] = collections.Counter()
    peak: collections.Counter[int] = collections.Counter()

    async def handler(params: dict[str, Any], ctx: ItemContext) -> None:
        i = params["i"]
        calls[i] += 1
        executing[i] += 1
        peak[i] = max(peak[i], executing[i])
        try:
            if i == 0:
                started0.set()
                await gate0.wait()
            elif i == 1:
                await asyncio.sleep(0.3)
        finally:
            executing[i] -= 1

    r = runner(batch, handler)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(started0.wait(), TIMEOUT)
    (item1,) = r.store.reserved_item_ids()
    await lose_reservation(item1)  # nobody else takes it: wA's own step may reserve it again
    gate0.set()
    await asyncio.wait_for(task, TIMEOUT)
    done = await BatchJob.objects.aget(pk=batch.pk)
    assert (done.status, done.succeeded_items) == (BatchStatus.SUCCEEDED, 3)
    assert peak[1] == 1, "never two runs of item 1 at once"
    assert 1 <= calls[1] <= 2, "at most the stopped run and the counted one"


async def test_a_runner_waiting_for_a_worker_slot_holds_no_reservations_and_cancels_at_once() -> None:
    b1 = await submit(handler="demo.noop", items=[{"i": i} for i in range(5)], max_parallel=1)
    b2 = await submit(handler="demo.noop", items=[{"i": 0}], max_parallel=1)
    slots = Limiter(1)  # worker concurrency 1
    gate1, started1, gate2, started2 = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def h1(params: dict[str, Any], ctx: ItemContext) -> None:
        if params["i"] == 0:
            started1.set()
            await gate1.wait()

    async def h2(params: dict[str, Any], ctx: ItemContext) -> None:
        started2.set()
        await gate2.wait()  # a long item of another batch

    r1, r2 = runner(b1, h1, worker_slots=slots), runner(b2, h2, worker_slots=slots)
    t1 = asyncio.create_task(r1.run())
    await asyncio.wait_for(started1.wait(), TIMEOUT)
    assert r1.store.reserved_item_ids(), "b1 reserved an item for its slot"
    t2 = asyncio.create_task(r2.run())
    await until(lambda: _true(slots.waiting == 1))  # b2 waits for the worker slot
    gate1.set()  # b1's item ends: the slot goes to b2, and b1 gives its reservation back
    await asyncio.wait_for(started2.wait(), TIMEOUT)
    await until(lambda: _no_reservations(b1.id))
    assert r1.store.reserved_item_ids() == []
    await sync_to_async(services.request_cancel)(batch_id=b1.id)
    r1.cancel()  # what the worker does when it sees the cancel
    await until(lambda: _status(b1.id, BatchStatus.CANCELLED), timeout=2)
    gate2.set()
    async with asyncio.timeout(TIMEOUT):
        await t1
        await t2


async def test_a_step_that_reports_the_batch_cancelling_stops_handovers() -> None:
    batch = await submit(handler="demo.noop", items=[{"i": i} for i in range(10)], max_parallel=1)
    store = DatabaseStore(batch_id=batch.id, worker_id="wA", lease_seconds=30)
    store.reserve_target = 3
    claim = await store.claim(1)
    assert len(store.reserved_item_ids()) == 3
    await sync_to_async(services.request_cancel)(batch_id=batch.id)
    store.enqueue([Outcome(claim.items[0].id, ItemStatus.SUCCEEDED)])
    await store.flush()  # its answer says "cancelling"
    assert store.take_reserved() is None
    await store.close()
    done = await BatchJob.objects.aget(pk=batch.pk)
    assert (done.status, done.succeeded_items, done.cancelled_items) == (BatchStatus.CANCELLED, 1, 9)


async def _true(value: bool) -> bool:
    return value


async def _settled(executing: collections.Counter[int], index: int) -> bool:
    return executing[index] == 0


async def _no_reservations(batch_id: uuid.UUID) -> bool:
    return (
        not await BatchJobItem.objects.filter(batch_id=batch_id, status=ItemStatus.PENDING)
        .exclude(lease_owner="")
        .aexists()
    )


async def _status(batch_id: uuid.UUID, status: str) -> bool:
    return (await BatchJob.objects.aget(pk=batch_id)).status == status


async def _status_is(batch_id: uuid.UUID, index: int, *statuses: str) -> bool:
    return (await BatchJobItem.objects.aget(batch_id=batch_id, index=index)).status in statuses


async def test_a_second_worker_gets_a_share_of_a_cap_the_first_one_holds() -> None:
    """wA runs all 4 slots and keeps them through handovers; wB's claim finds the cap taken.
    The cap is then shared: wA stops replacing items above its share, wB runs the rest, and
    the two never run more than the cap together."""
    batch = await submit(handler="demo.noop", items=[{"i": i} for i in range(100)], max_parallel=4)
    ran: collections.Counter[str] = collections.Counter()
    now_running = {"n": 0, "peak": 0}

    def handler_of(name: str) -> Any:
        async def handler(params: dict[str, Any], ctx: ItemContext) -> None:
            ran[name] += 1
            now_running["n"] += 1
            now_running["peak"] = max(now_running["peak"], now_running["n"])
            try:
                await asyncio.sleep(0.01)
            finally:
                now_running["n"] -= 1

        return handler

    a = runner(batch, handler_of("A"), worker="wA", parallel=4)
    b = runner(batch, handler_of("B"), worker="wB", parallel=4)
    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
        group.create_task(a.run())
        await until(lambda: _async_true(len(a.running_item_ids) == 4))
        group.create_task(b.run())
        await until(lambda: _async_true(a.store.share == 2))  # wB refused: 4 slots over 2 workers
    assert ran["A"] + ran["B"] == 100
    assert ran["B"] >= 10, ran
    assert now_running["peak"] <= 4
    final = await BatchJob.objects.aget(pk=batch.pk)
    assert (final.status, final.succeeded_items, final.running_items) == (BatchStatus.SUCCEEDED, 100, 0)


async def _async_true(value: bool) -> bool:
    return value


async def test_the_watch_loop_lifts_a_lapsed_share_of_a_worker_whose_items_run_long() -> None:
    """Found in review: wA at its share of 2 makes no step while its items run, so only the
    worker's poll of the batch (`batch_states`) can tell it that the share lapsed."""
    batch = await submit(handler="demo.noop", items=[{"i": i} for i in range(20)], max_parallel=4)
    gates = {i: asyncio.Event() for i in range(20)}
    running: set[int] = set()

    async def held(params: dict[str, Any], ctx: ItemContext) -> None:
        running.add(params["i"])
        try:
            await gates[params["i"]].wait()
        finally:
            running.discard(params["i"])

    async def watch_poll() -> None:  # what Worker._apply_batch_states does for this runner
        state = (await sync_to_async(selectors.batch_states)([batch.id]))[batch.id]
        a.observe_share(state.share_for("wA", timezone.now()))
        a.resize(state.effective_parallel)

    a = runner(batch, held, worker="wA", parallel=4)
    async with asyncio.timeout(TIMEOUT):
        task = asyncio.create_task(a.run())
        await until(lambda: _async_true(len(running) == 4))
        refused = await step(batch_id=batch.id, worker_id="wB", outcomes=(), claim_limit=4, lease_seconds=30)
        assert refused.items == []
        await watch_poll()  # heard before any of its items ended
        assert a.parallel == 2
        for i in sorted(running)[:2]:  # above the share: not replaced
            gates[i].set()
            await until(lambda i=i: _async_true(i not in running))
        await until(lambda: _async_true(len(running) == 2))
        await sync_to_async(BatchJob.objects.filter(pk=batch.id).update)(
            worker_share_until=timezone.now() - timedelta(seconds=1)  # wB left; 2 s passed
        )
        await watch_poll()
        assert a.parallel == 4
        await until(lambda: _async_true(len(running) == 4))  # it claims the room back
        for gate in gates.values():
            gate.set()
        await task
    final = await BatchJob.objects.aget(pk=batch.pk)
    assert (final.status, final.succeeded_items, final.running_items) == (BatchStatus.SUCCEEDED, 20, 0)
