"""GroupCommit: a value the database refuses fails only its own item."""

from __future__ import annotations

import asyncio
import threading

import pytest
from django.db import DataError, ProgrammingError

from batch.models import ItemStatus
from batch.services import Claim, ClaimedItem, Outcome, Step
from batch.store import GroupCommit


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
