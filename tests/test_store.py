"""DatabaseStore (group commit, held items) and the step it writes (both databases)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from django.db import DataError, ProgrammingError

from batch import services
from batch.models import BatchJob, BatchJobItem, ItemStatus
from batch.services import ClaimedItem, Outcome, Start, Step, StepResult
from batch.store import DatabaseStore


def fake_store(write: Any) -> DatabaseStore:
    store = DatabaseStore(batch_id=uuid.uuid4(), worker_id="w1", lease_seconds=30)
    store._write = write  # type: ignore[method-assign]
    return store


async def test_a_refused_outcome_fails_alone_and_the_rest_of_the_step_happens() -> None:
    written: list[Outcome] = []
    fetched: list[int] = []

    def write(step: Step) -> StepResult:
        if any(o.error == "poison" for o in step.outcomes):
            raise DataError("invalid byte sequence")
        written.extend(step.outcomes)
        fetched.append(step.fetch)
        return StepResult(fetched=[], status="running")

    store = fake_store(write)
    good = [Outcome(1, ItemStatus.SUCCEEDED), Outcome(3, ItemStatus.SUCCEEDED)]
    bad = Outcome(2, ItemStatus.FAILED, error="poison")
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        for outcome in (good[0], bad, good[1]):
            group.create_task(store.complete([outcome]))
        group.create_task(store.refill())
    by_id = {o.item_id: o for o in written}
    assert by_id[1].status == by_id[3].status == ItemStatus.SUCCEEDED
    assert by_id[2].status == ItemStatus.FAILED and "could not be stored" in by_id[2].error
    assert max(fetched) >= 1  # the refill still fetched


async def test_queued_outcomes_are_written_by_flush_and_a_lasting_failure_surfaces() -> None:
    written: list[int] = []

    def write(step: Step) -> StepResult:
        if any(o.item_id == 13 for o in step.outcomes):
            raise ProgrammingError("a bug, not a transient error")
        written.extend(o.item_id for o in step.outcomes)
        return StepResult(fetched=[], status="running")

    store = fake_store(write)
    store.enqueue([Outcome(1, ItemStatus.SUCCEEDED)])
    store.enqueue([Outcome(2, ItemStatus.SUCCEEDED)])
    async with asyncio.timeout(10):
        await store.flush()
    assert written == [1, 2]
    store.enqueue([Outcome(13, ItemStatus.SUCCEEDED)])
    with pytest.raises(ProgrammingError):
        async with asyncio.timeout(10):
            await store.flush()
    with pytest.raises(ProgrammingError):
        store.enqueue([Outcome(14, ItemStatus.SUCCEEDED)])


async def test_an_outcome_is_written_no_later_than_the_start_of_the_item_that_took_its_slot() -> None:
    steps: list[Step] = []

    def write(step: Step) -> StepResult:
        steps.append(step)
        return StepResult(fetched=[], status="running")

    store = fake_store(write)
    store._held.append(ClaimedItem(id=2, index=1, params={}, attempt=1))
    store.enqueue([Outcome(1, ItemStatus.SUCCEEDED)])  # item 1 finished ...
    assert store.take() is not None  # ... and item 2 took its slot
    async with asyncio.timeout(10):
        await store.flush()
    first_start = next(n for n, s in enumerate(steps) if s.started)
    first_outcome = next(n for n, s in enumerate(steps) if s.outcomes)
    assert first_outcome <= first_start


async def test_items_fetched_while_closing_go_back() -> None:
    item = ClaimedItem(id=5, index=0, params={}, attempt=1)
    steps: list[Step] = []
    writing, proceed = threading.Event(), threading.Event()

    def write(step: Step) -> StepResult:
        steps.append(step)
        writing.set()
        proceed.wait(10)
        return StepResult(fetched=[item] if step.fetch else [], status="running")

    store = fake_store(write)
    store.hold_target = 4
    store.enqueue([Outcome(1, ItemStatus.SUCCEEDED)])  # a write that fetches ...
    await asyncio.to_thread(writing.wait, 10)
    closing = asyncio.ensure_future(store.close())  # ... closes while it is in flight
    await asyncio.sleep(0)
    proceed.set()
    async with asyncio.timeout(10):
        await closing
    assert steps[0].fetch == 4
    assert store.held_item_ids() == [] and [5] in [s.give_back for s in steps]


# --- the step on the real database (SQLite and PostgreSQL) ----------------------------------


def step(batch: BatchJob, worker: str = "w1", **parts: Any) -> StepResult:
    return services.run_step(batch_id=batch.pk, worker_id=worker, lease_seconds=30, step=Step(**parts))


def statuses(batch: BatchJob) -> dict[int, tuple[str, str]]:
    return {i.index: (i.status, i.lease_owner) for i in BatchJobItem.objects.filter(batch=batch)}


@pytest.mark.django_db
def test_fetch_holds_items_in_index_order_without_starting_them(submit: Any) -> None:
    batch = submit("demo.noop", [{}] * 5)
    got = step(batch, fetch=3).fetched
    assert [i.index for i in got] == [0, 1, 2] and [i.attempt for i in got] == [1, 1, 1]
    assert statuses(batch)[0] == ("pending", "w1") and statuses(batch)[3] == ("pending", "")
    assert step(batch, worker="w2", fetch=5).fetched[0].index == 3  # held items are not fetched twice
    batch.refresh_from_db()
    assert (batch.status, batch.running_items) == ("pending", 0)


@pytest.mark.django_db
def test_starts_and_outcomes_move_counters_by_deltas_and_finish_the_batch(submit: Any) -> None:
    batch = submit("demo.noop", [{}] * 2)
    items = step(batch, fetch=2).fetched
    result = step(batch, started=[Start(i.id) for i in items])
    assert result.status == "running"
    result = step(batch, outcomes=[Outcome(items[0].id, ItemStatus.SUCCEEDED), Outcome(items[1].id, ItemStatus.FAILED)])
    batch.refresh_from_db()
    assert result.status == batch.status == "failed"
    assert (batch.running_items, batch.succeeded_items, batch.failed_items) == (0, 1, 1)
    assert batch.started_at is not None and batch.finished_at is not None


@pytest.mark.django_db
def test_a_retried_step_after_a_lost_reply_leaves_no_phantom_running_item(submit: Any) -> None:
    """The first write committed but its reply was lost; the worker writes the same step again.
    The start must be accepted again (the item runs here), not refused (which would drop the
    run and leave the item running in the database until its lease expired)."""
    batch = submit("demo.noop", [{}] * 2)
    first, second = step(batch, fetch=2).fetched
    parts = {"started": [Start(first.id), Start(second.id)], "outcomes": [Outcome(first.id, ItemStatus.SUCCEEDED)]}
    step(batch, **parts)  # committed; the reply was lost
    again = step(batch, **parts)  # the retry
    assert again.refused == [first.id]  # finished already: nothing runs here for it
    assert second.id not in again.refused  # still running here, accepted
    step(batch, outcomes=[Outcome(second.id, ItemStatus.SUCCEEDED)])
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items, batch.running_items) == ("succeeded", 2, 0)


@pytest.mark.django_db
def test_a_start_of_an_item_whose_lease_was_lost_is_refused(submit: Any) -> None:
    batch = submit("demo.noop", [{}])
    (item,) = step(batch, fetch=1).fetched
    BatchJobItem.objects.filter(pk=item.id).update(lease_owner="w2")  # recovered and taken by w2
    assert step(batch, started=[Start(item.id)]).refused == [item.id]
    assert step(batch, outcomes=[Outcome(item.id, ItemStatus.SUCCEEDED)]).status is None  # discarded
    assert statuses(batch)[0] == ("pending", "w2")


@pytest.mark.django_db
def test_held_items_given_back_in_a_cancelling_batch_are_cancelled(submit: Any) -> None:
    batch = submit("demo.noop", [{}] * 3)
    held = step(batch, fetch=2).fetched
    services.request_cancel(batch_id=batch.pk)  # cancels the one nobody holds
    result = step(batch, give_back=[i.id for i in held])
    batch.refresh_from_db()
    assert result.status == batch.status == "cancelled" and batch.cancelled_items == 3


@pytest.mark.django_db
def test_a_cancelled_batch_fetches_nothing(submit: Any) -> None:
    batch = submit("demo.noop", [{}] * 3)
    step(batch, fetch=1)
    services.request_cancel(batch_id=batch.pk)
    assert step(batch, fetch=5).fetched == []
