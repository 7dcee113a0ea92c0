"""The runner driven by an in-memory store: no database, deterministic gates, recorded peaks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from batch.handlers import HandlerSpec, ItemContext
from batch.models import ItemStatus
from batch.runner import MAX_HOLD, BatchRunner
from batch.services import ClaimedItem, Outcome, effective_parallel
from batch.slots import Limiter, WorkerSlots
from batch.sync_calls import ThreadCalls

TIMEOUT = 10


class MemoryStore:
    """A BatchStore over a list; records every fetch, start and outcome."""

    def __init__(self, count: int) -> None:
        self.pending = [ClaimedItem(id=i, index=i, params={"i": i}, attempt=1) for i in range(count)]
        self.held: list[ClaimedItem] = []
        self.hold_target = 0
        self.exhausted = False
        self.on_refused: Callable[[list[int]], None] = lambda ids: None
        self.fetches: list[int] = []
        self.started: list[int] = []
        self.outcomes: dict[int, Outcome] = {}
        self.released: list[int] = []
        self.given_back: list[int] = []
        self.peak_held = 0
        self.closed = False

    def take(self) -> ClaimedItem | None:
        if not self.held:
            return None
        item = self.held.pop(0)
        self.started.append(item.id)
        return item

    def held_item_ids(self) -> list[int]:
        return [item.id for item in self.held]

    def enqueue(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            assert outcome.item_id not in self.outcomes, "an item completed twice"
            self.outcomes[outcome.item_id] = outcome
        self._top_up()

    async def complete(self, outcomes: list[Outcome]) -> None:
        self.enqueue(outcomes)

    async def refill(self) -> None:
        await asyncio.sleep(0)  # a write's round trip
        self._top_up(at_least=1)

    def _top_up(self, at_least: int = 0) -> None:
        if self.closed:
            return
        wanted = max(self.hold_target - len(self.held), at_least)
        if wanted <= 0:
            return
        self.fetches.append(wanted)
        taken, self.pending = self.pending[:wanted], self.pending[wanted:]
        self.held += taken
        self.exhausted = len(taken) < wanted
        self.peak_held = max(self.peak_held, len(self.held))

    def trim(self, keep: int) -> None:
        while len(self.held) > max(keep, 0):
            item = self.held.pop()
            self.given_back.append(item.id)
            self.pending.insert(0, item)

    async def close(self) -> None:
        self.closed = True
        self.trim(0)

    async def flush(self) -> None:
        pass

    async def release(self, item_ids: list[int]) -> None:
        self.released.extend(item_ids)

    def count(self, status: ItemStatus) -> int:
        return sum(1 for o in self.outcomes.values() if o.status == status)


class Probe:
    """Counts concurrently running handlers. The first `gate_at` to arrive wait for each
    other, so the recorded peak reaches the cap exactly when the cap is right; before
    leaving, each yields so any task that the cap failed to hold back starts and is seen."""

    def __init__(self, gate_at: int) -> None:
        self.gate_at = gate_at
        self.running = 0
        self.peak = 0
        self.calls = 0
        self.gate = asyncio.Event()

    async def __call__(self, params: dict[str, Any], ctx: ItemContext) -> dict[str, int]:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running >= self.gate_at:
            self.gate.set()
        await self.gate.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        self.running -= 1
        return {"i": params["i"]}


def spec(func: Any, *, is_async: bool = True, isolation: str = "process") -> HandlerSpec:
    return HandlerSpec(name="test", func=func, params=None, is_async=is_async, description="", isolation=isolation)


def runner_for(store: MemoryStore, func: Any, parallel: int, **kwargs: Any) -> BatchRunner:
    is_async = kwargs.pop("is_async", True)
    return BatchRunner(
        batch_id=uuid.uuid4(),
        handler=spec(func, is_async=is_async, isolation="thread"),
        store=store,
        parallel=parallel,
        sync_calls=kwargs.pop("sync_calls", None) or ThreadCalls(max(parallel, 1)),
        **kwargs,
    )


@pytest.mark.parametrize(("max_parallel", "expected_peak"), [(8, 4), (4, 4), (2, 2), (1, 1)])
async def test_peak_running_is_exactly_effective_parallel(settings: Any, max_parallel: int, expected_peak: int) -> None:
    settings.BATCH_GLOBAL_MAX_PARALLEL = 4
    parallel = effective_parallel(max_parallel)
    store, probe = MemoryStore(40), Probe(gate_at=expected_peak)
    await asyncio.wait_for(runner_for(store, probe, parallel).run(), TIMEOUT)
    assert probe.peak == expected_peak
    assert store.count(ItemStatus.SUCCEEDED) == 40


async def test_a_cap_the_semaphore_does_not_enforce_would_be_caught() -> None:
    """The probe itself can fail: with 8 slots it records 8, not 4."""
    store, probe = MemoryStore(40), Probe(gate_at=8)
    await asyncio.wait_for(runner_for(store, probe, 8).run(), TIMEOUT)
    assert probe.peak == 8


async def test_items_are_held_lazily_never_more_than_the_hold_target() -> None:
    store, probe = MemoryStore(2000), Probe(gate_at=3)
    await asyncio.wait_for(runner_for(store, probe, 3).run(), TIMEOUT)
    assert store.count(ItemStatus.SUCCEEDED) == 2000
    assert 3 <= store.peak_held <= MAX_HOLD
    assert max(store.fetches) <= MAX_HOLD


async def test_a_runner_without_permits_starts_nothing_until_granted() -> None:
    store, probe = MemoryStore(6), Probe(gate_at=2)
    runner = runner_for(store, probe, 0)
    run = asyncio.ensure_future(runner.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert probe.calls == 0 and store.started == []
    runner.resize(2)  # the grant arrives
    await asyncio.wait_for(run, TIMEOUT)
    assert probe.peak == 2 and store.count(ItemStatus.SUCCEEDED) == 6


async def test_cancel_of_a_runner_without_permits_ends_it() -> None:
    store = MemoryStore(6)
    runner = runner_for(store, Probe(gate_at=1), 0)
    run = asyncio.ensure_future(runner.run())
    await asyncio.sleep(0)
    runner.cancel()
    await asyncio.wait_for(run, TIMEOUT)
    assert store.started == [] and store.closed


async def test_worker_slots_bound_items_across_batches() -> None:
    slots = WorkerSlots(3)
    probe = Probe(gate_at=3)
    stores = [MemoryStore(10), MemoryStore(10)]
    runners = [runner_for(store, probe, 4, worker_slots=slots) for store in stores]
    async with asyncio.TaskGroup() as group:
        for runner in runners:
            group.create_task(asyncio.wait_for(runner.run(), TIMEOUT))
    assert probe.peak == 3
    assert all(store.count(ItemStatus.SUCCEEDED) == 10 for store in stores)


async def test_a_freed_worker_slot_goes_to_the_owner_running_the_fewest() -> None:
    """Owner a holds both slots and waits for a third; owner b waits too: b gets the next one."""
    slots, stop = WorkerSlots(2), asyncio.Event()
    assert await slots.acquire("a", stop) and await slots.acquire("a", stop)
    order: list[str] = []

    async def want(owner: str) -> None:
        assert await slots.acquire(owner, stop)
        order.append(owner)

    first_a = asyncio.ensure_future(want("a"))
    await asyncio.sleep(0)
    then_b = asyncio.ensure_future(want("b"))
    await asyncio.sleep(0)
    slots.release("a")
    await asyncio.wait_for(then_b, TIMEOUT)
    assert order == ["b"] and not first_a.done()
    slots.release("a")
    await asyncio.wait_for(first_a, TIMEOUT)
    assert order == ["b", "a"]


async def test_handler_exception_fails_only_that_item() -> None:
    async def flaky(params: dict[str, Any], ctx: ItemContext) -> int:
        if params["i"] % 3 == 0:
            raise ValueError(f"bad item {params['i']}")
        return params["i"]

    store = MemoryStore(9)
    await asyncio.wait_for(runner_for(store, flaky, 2).run(), TIMEOUT)
    assert store.count(ItemStatus.FAILED) == 3 and store.count(ItemStatus.SUCCEEDED) == 6
    assert store.outcomes[3].error == "ValueError: bad item 3"


@pytest.mark.parametrize("bad", [object(), float("nan"), {"k": {1, 2}}])
async def test_unserializable_result_fails_the_item_not_the_batch(bad: object) -> None:
    async def returns_object(params: dict[str, Any], ctx: ItemContext) -> object:
        return bad

    store = MemoryStore(2)
    await asyncio.wait_for(runner_for(store, returns_object, 2).run(), TIMEOUT)
    assert store.count(ItemStatus.FAILED) == 2
    assert store.outcomes[0].error.startswith("Result is not JSON serializable")


async def test_cooperative_cancel_launches_nothing_more_and_stops_running_items() -> None:
    started = asyncio.Event()

    async def waits(params: dict[str, Any], ctx: ItemContext) -> None:
        started.set()
        await ctx.sleep(60)

    store = MemoryStore(50)
    runner = runner_for(store, waits, 3)
    run = asyncio.ensure_future(runner.run())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    while len(runner.running_item_ids) < 3:
        await asyncio.sleep(0)
    runner.cancel()
    await asyncio.wait_for(run, TIMEOUT)
    assert store.count(ItemStatus.CANCELLED) == 3 and len(store.outcomes) == 3
    assert len(store.started) == 3  # nothing launched after the cancel
    assert store.closed and store.held == []  # the held items went back


async def test_force_cancel_stops_a_handler_that_ignores_cancellation() -> None:
    running = asyncio.Event()

    async def stubborn(params: dict[str, Any], ctx: ItemContext) -> None:
        running.set()
        await asyncio.sleep(3600)  # no checkpoint

    store = MemoryStore(1)
    runner = runner_for(store, stubborn, 1)
    run = asyncio.ensure_future(runner.run())
    await asyncio.wait_for(running.wait(), TIMEOUT)
    runner.cancel()
    await asyncio.sleep(0)
    assert not run.done()  # cooperative cancel alone does not stop it
    runner.force_cancel()
    await asyncio.wait_for(run, TIMEOUT)
    assert store.outcomes[0].status == ItemStatus.CANCELLED
    assert "by force" in store.outcomes[0].error


async def test_abort_gives_running_items_back() -> None:
    running = asyncio.Event()

    async def long(params: dict[str, Any], ctx: ItemContext) -> None:
        running.set()
        await asyncio.sleep(3600)

    store = MemoryStore(5)
    runner = runner_for(store, long, 2)
    run = asyncio.ensure_future(runner.run())
    await asyncio.wait_for(running.wait(), TIMEOUT)
    while len(runner.running_item_ids) < 2:
        await asyncio.sleep(0)
    runner.abort()
    await asyncio.wait_for(run, TIMEOUT)
    assert sorted(store.released) == [0, 1] and store.outcomes == {}


async def test_a_handlers_own_timeout_error_is_a_failure_not_the_item_timeout() -> None:
    async def raises(params: dict[str, Any], ctx: ItemContext) -> None:
        raise TimeoutError("upstream timed out")

    store = MemoryStore(1)
    await asyncio.wait_for(runner_for(store, raises, 1, item_timeout=30).run(), TIMEOUT)
    assert store.outcomes[0].error == "TimeoutError: upstream timed out"


async def test_the_item_timeout_stops_an_async_handler_and_frees_its_slot() -> None:
    stopped: list[int] = []

    async def slow(params: dict[str, Any], ctx: ItemContext) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(params["i"])

    store = MemoryStore(3)
    await asyncio.wait_for(runner_for(store, slow, 1, item_timeout=0.05).run(), TIMEOUT)
    assert [o.error for o in store.outcomes.values()] == ["Timed out after 0.05 s."] * 3
    assert sorted(stopped) == [0, 1, 2]  # each handler really stopped


async def test_resize_while_running_changes_the_cap() -> None:
    release = asyncio.Event()
    running, peak_after = 0, 0
    resized = False

    async def held(params: dict[str, Any], ctx: ItemContext) -> None:
        nonlocal running, peak_after
        running += 1
        if resized:
            peak_after = max(peak_after, running)
        await release.wait()
        running -= 1

    store = MemoryStore(30)
    runner = runner_for(store, held, 4)
    run = asyncio.ensure_future(runner.run())
    while running < 4:
        await asyncio.sleep(0)
    runner.resize(1)
    resized = True
    release.set()
    await asyncio.wait_for(run, TIMEOUT)
    assert peak_after == 1  # once the four drained, one at a time
    assert store.count(ItemStatus.SUCCEEDED) == 30


def test_a_shrunk_limiter_never_interrupts_holders_and_admits_fewer() -> None:
    limiter = Limiter(3)
    limiter.in_use = 3
    limiter.resize(1)
    assert limiter.free == 0
    limiter.release()
    limiter.release()
    assert limiter.free == 0  # 1 still held: the cap of 1 is taken
    limiter.release()
    assert limiter.free == 1


async def test_nul_characters_never_reach_the_database() -> None:
    async def nul(params: dict[str, Any], ctx: ItemContext) -> dict[str, str]:
        if params["i"] == 0:
            raise ValueError("bad\x00byte")
        return {"v": "a\x00b"}

    store = MemoryStore(2)
    await asyncio.wait_for(runner_for(store, nul, 2).run(), TIMEOUT)
    assert store.outcomes[0].error == "ValueError: bad\\x00byte"
    assert store.outcomes[1].status == ItemStatus.FAILED and "NUL" in store.outcomes[1].error


async def test_a_refused_start_stops_that_item_here_silently() -> None:
    """The database refused a start (the item's lease was lost; another worker may run it)."""
    running = asyncio.Event()
    stopped: list[int] = []

    async def long(params: dict[str, Any], ctx: ItemContext) -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(params["i"])

    store = MemoryStore(1)
    runner = runner_for(store, long, 1)
    run = asyncio.ensure_future(runner.run())
    await asyncio.wait_for(running.wait(), TIMEOUT)
    store.on_refused([0])
    await asyncio.wait_for(run, TIMEOUT)
    assert stopped == [0] and store.outcomes == {} and store.released == []


async def test_a_thread_handler_keeps_its_slot_until_the_thread_returns() -> None:
    """A thread cannot be stopped: force cancel waits for it, and no other item starts meanwhile."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def blocking(params: dict[str, Any], ctx: ItemContext) -> int:
        entered.set()
        release.wait(30)
        return params["i"]

    store = MemoryStore(3)
    runner = runner_for(store, blocking, 1, is_async=False)
    run = asyncio.ensure_future(runner.run())
    await asyncio.wait_for(asyncio.to_thread(entered.wait, 30), TIMEOUT)
    runner.force_cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not run.done() and runner.running_item_ids == [0]  # still holds its slot
    assert store.started == [0]
    release.set()
    await asyncio.wait_for(run, TIMEOUT)
    assert store.outcomes[0].status == ItemStatus.CANCELLED and store.started == [0]
