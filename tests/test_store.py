"""GroupCommit: a value the database refuses fails only its own item."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from django.db import DataError, ProgrammingError

from batch.models import ItemStatus
from batch.services import Claim, ClaimedItem, Outcome, Step
from batch.store import MAX_RESERVED, DatabaseStore, GroupCommit


async def test_a_refused_outcome_fails_alone_and_the_claim_still_happens() -> None:
    written: list[Outcome] = []
    claimed: list[int] = []

    def write(step: Step) -> Claim:
        outcomes, limit = step.outcomes, step.claim
        if (len(outcomes) > 1 and any(o.error == "poison" for o in outcomes)) or [o.error for o in outcomes] == [
            "poison"
        ]:
            raise DataError("invalid byte sequence")
        written.extend(outcomes)
        claimed.append(limit)
        return Claim(items=[], pending=0, status="running")

    commit = GroupCommit(write)
    good = [Outcome(1, ItemStatus.SUCCEEDED), Outcome(3, ItemStatus.SUCCEEDED)]
    bad = Outcome(2, ItemStatus.FAILED, error="poison")
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        for outcome in (good[0], bad, good[1]):
            group.create_task(commit.submit([outcome]))
        group.create_task(commit.claim(4))
    by_id = {o.item_id: o for o in written}
    assert by_id[1].status == by_id[3].status == ItemStatus.SUCCEEDED
    assert by_id[2].status == ItemStatus.FAILED
    assert "could not be stored" in by_id[2].error
    assert 4 in claimed


async def test_a_claim_whose_caller_was_cancelled_is_given_back() -> None:
    writing, proceed = threading.Event(), threading.Event()
    released: list[list[int]] = []

    def write(step: Step) -> Claim:
        writing.set()
        proceed.wait(10)
        return Claim(items=[ClaimedItem(id=7, index=0, params={}, attempt=1)], pending=0, status="running")

    async def release(item_ids: list[int]) -> None:
        released.append(item_ids)

    commit = GroupCommit(write, release=release)
    caller = asyncio.create_task(commit.claim(1))
    await asyncio.to_thread(writing.wait, 10)
    caller.cancel()
    proceed.set()
    async with asyncio.timeout(10):
        while not released:
            await asyncio.sleep(0.01)
    assert released == [[7]]
    assert caller.cancelled()


async def test_queued_outcomes_are_written_by_flush_and_a_lasting_failure_surfaces() -> None:
    written: list[int] = []

    def write(step: Step) -> Claim:
        if any(o.item_id == 13 for o in step.outcomes):
            raise ProgrammingError("a bug, not a transient error")
        written.extend(o.item_id for o in step.outcomes)
        return Claim(items=[], pending=0, status="running")

    commit = GroupCommit(write)
    commit.enqueue([Outcome(1, ItemStatus.SUCCEEDED)])
    commit.enqueue([Outcome(2, ItemStatus.SUCCEEDED)])
    async with asyncio.timeout(10):
        await commit.flush()
    assert written == [1, 2]
    commit.enqueue([Outcome(13, ItemStatus.SUCCEEDED)])
    with pytest.raises(ProgrammingError):
        async with asyncio.timeout(10):
            await commit.flush()
    with pytest.raises(ProgrammingError):
        commit.enqueue([Outcome(14, ItemStatus.SUCCEEDED)])


# --- how many a write reserves (DatabaseStore's plan; no database) ---------------------------


def _store(*, held: int, target: int, depth: int = 0, rate: float, write_seconds: float) -> DatabaseStore:
    store = DatabaseStore(batch_id=uuid.uuid4(), worker_id="w1", lease_seconds=30)
    store._reserved.extend(ClaimedItem(id=i, index=i, params={}, attempt=1) for i in range(held))
    store.reserve_target, store.reserve_depth, store.start_rate = target, depth, rate
    store._write_seconds = write_seconds
    return store


def _planned(store: DatabaseStore, claim: int = 0) -> Step:
    step = Step(claim=claim)
    store._plan(step)
    return step


def test_slow_items_are_topped_up_to_the_target_only() -> None:
    # 4 running items of 50 ms, writes of 5 ms: none of the 3 held will have started meanwhile.
    store = _store(held=3, target=4, rate=4 / 0.05, write_seconds=0.005)
    assert _planned(store).reserve == 1


def test_instant_items_get_a_full_set_to_run_while_the_held_ones_are_used_up() -> None:
    # They start 100,000 a second; in a 10 ms write all 200 held go.
    store = _store(held=200, target=256, rate=100_000, write_seconds=0.01)
    assert _planned(store).reserve == 256


def test_a_worker_never_holds_more_than_the_most_reserved() -> None:
    store = _store(held=MAX_RESERVED - 10, target=256, rate=100_000, write_seconds=0.01)
    assert _planned(store).reserve == 10
    store = _store(held=MAX_RESERVED, target=256, depth=64, rate=100_000, write_seconds=0.01)
    step = _planned(store, claim=4)
    assert (step.reserve, step.reserve_per_claim) == (0, 0)


def test_a_claim_reserves_for_the_items_it_starts_within_one_writes_top_up() -> None:
    # Nothing runs (every slot is free): no target, but each claimed item gets its depth.
    store = _store(held=0, target=0, depth=64, rate=0.0, write_seconds=0.01)
    step = _planned(store, claim=4)
    assert (step.reserve, step.reserve_per_claim) == (0, 64)
    store = _store(held=0, target=0, depth=64, rate=0.0, write_seconds=0.01)
    step = _planned(store, claim=32)
    assert step.reserve_per_claim * 32 <= MAX_RESERVED // 2


async def test_one_slow_write_does_not_inflate_the_reservations_of_slow_items() -> None:
    """A write that waited out a database outage (retries) must not make the worker reserve
    for seconds of work afterwards (found in review: 16 slots of 100 ms items held 71)."""
    store = _store(held=0, target=16, depth=1, rate=16 / 0.1, write_seconds=0.0)
    next_id, consumed, peak = 0, 0.0, 0

    async def write(seconds: float) -> None:
        nonlocal next_id, consumed
        step = Step()
        store._plan(step)
        store._write_began -= seconds
        new = [ClaimedItem(id=next_id + k, index=0, params={}, attempt=1) for k in range(step.reserve)]
        next_id += step.reserve
        await store._settle(step, Claim(items=[], pending=10_000, status="running", reserved=new))
        consumed += store.start_rate * seconds  # handovers while it was in flight
        while consumed >= 1 and store._reserved:
            store._reserved.popleft()
            consumed -= 1
        consumed = min(consumed, 1.0)

    for _ in range(20):
        await write(0.01)
    await write(5.0)
    for _ in range(60):
        await write(0.01)
        peak = max(peak, len(store._reserved))
    assert peak <= 2 * 16
