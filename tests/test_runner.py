"""The runner driven by an in-memory store: no database, deterministic gates, recorded peaks."""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from batch.handlers import HandlerSpec, ItemContext
from batch.models import ItemStatus
from batch.runner import MAX_DEPTH, BatchRunner, Limiter
from batch.services import Claim, ClaimedItem, Outcome, effective_parallel

TIMEOUT = 10


class MemoryStore:
    """A BatchStore over a list; records every claim size and every outcome."""

    def __init__(self, count: int) -> None:
        self.pending = [ClaimedItem(id=i, index=i, params={"i": i}, attempt=1) for i in range(count)]
        self.claims: list[int] = []
        self.outcomes: dict[int, Outcome] = {}
        self.released: list[int] = []
        self.status = "running"

    async def claim(self, limit: int) -> Claim:
        self.claims.append(limit)
        if self.status != "running":
            return Claim(items=[], pending=0, status=self.status)
        taken, self.pending = self.pending[:limit], self.pending[limit:]
        return Claim(items=taken, pending=len(self.pending), status=self.status)

    async def complete(self, outcomes: list[Outcome]) -> None:
        self.enqueue(outcomes)

    def enqueue(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            assert outcome.item_id not in self.outcomes, "an item completed twice"
            self.outcomes[outcome.item_id] = outcome

    async def flush(self) -> None:
        pass

    async def release(self, item_ids: list[int]) -> None:
        self.released.extend(item_ids)

    reserve_target = 0
    reserve_depth = 0
    start_rate = 0.0
    share: int | None = None

    def take_reserved(self) -> ClaimedItem | None:
        return None

    def reserved_item_ids(self) -> list[int]:
        return []

    def on_refused(self, callback: Any) -> None:
        self.refused_callback = callback

    async def trim(self, keep: int) -> None:
        pass

    async def close(self) -> None:
        pass

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


def spec(func: Any, *, is_async: bool = True) -> HandlerSpec:
    return HandlerSpec(name="test", func=func, params=None, is_async=is_async, description="")


def runner_for(store: MemoryStore, func: Any, parallel: int, **kwargs: Any) -> BatchRunner:
    return BatchRunner(
        batch_id=uuid.uuid4(),
        handler=spec(func, is_async=kwargs.pop("is_async", True)),
        store=store,
        parallel=parallel,
        executor=kwargs.pop("executor", None) or ThreadPoolExecutor(max_workers=parallel),
        idle_wait=0.01,
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


async def test_items_are_claimed_lazily_never_more_than_free_slots() -> None:
    store, probe = MemoryStore(100), Probe(gate_at=3)
    await asyncio.wait_for(runner_for(store, probe, 3).run(), TIMEOUT)
    assert max(store.claims) <= 3
    assert sum(store.claims) >= 100
    assert probe.calls == 100


async def test_worker_slots_bound_items_across_batches() -> None:
    shared = Limiter(3)
    probe = Probe(gate_at=3)
    first, second = MemoryStore(20), MemoryStore(20)
    runners = [runner_for(s, probe, 4, worker_slots=shared) for s in (first, second)]
    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
        for runner in runners:
            group.create_task(runner.run())
    assert probe.peak == 3
    assert len(first.outcomes) == len(second.outcomes) == 20


async def test_handler_exception_fails_only_that_item() -> None:
    async def flaky(params: dict[str, Any], ctx: ItemContext) -> int:
        if params["i"] % 5 == 0:
            raise ValueError(f"bad item {params['i']}")
        return int(params["i"])

    store = MemoryStore(20)
    await asyncio.wait_for(runner_for(store, flaky, 4).run(), TIMEOUT)
    assert store.count(ItemStatus.FAILED) == 4
    assert store.count(ItemStatus.SUCCEEDED) == 16
    assert store.outcomes[5].error == "ValueError: bad item 5"


@pytest.mark.parametrize("bad", [object(), {"x": float("nan")}])
async def test_unserializable_result_fails_the_item_not_the_batch(bad: object) -> None:
    async def returns_object(params: dict[str, Any], ctx: ItemContext) -> object:
        return bad

    store = MemoryStore(2)
    await asyncio.wait_for(runner_for(store, returns_object, 2).run(), TIMEOUT)
    assert store.count(ItemStatus.FAILED) == 2
    assert "not JSON serializable" in store.outcomes[0].error


async def test_cooperative_cancel_launches_nothing_more_and_stops_running_items() -> None:
    started = asyncio.Event()
    calls = 0

    async def waits(params: dict[str, Any], ctx: ItemContext) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            started.set()
        await ctx.sleep(3600)

    store = MemoryStore(50)
    runner = runner_for(store, waits, 2)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    store.status = "cancelling"
    runner.cancel()
    await asyncio.wait_for(task, TIMEOUT)
    assert calls == 2
    assert store.count(ItemStatus.CANCELLED) == 2
    assert all(o.error == "Cancelled at a checkpoint." for o in store.outcomes.values())


async def test_force_cancel_stops_a_handler_that_ignores_cancellation() -> None:
    started = asyncio.Event()

    async def stubborn(params: dict[str, Any], ctx: ItemContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    store = MemoryStore(1)
    runner = runner_for(store, stubborn, 1)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    runner.cancel()
    await asyncio.sleep(0.05)
    assert not task.done(), "a non-cooperative handler keeps running after a cooperative cancel"
    runner.force_cancel()
    await asyncio.wait_for(task, TIMEOUT)
    assert store.outcomes[0].status == ItemStatus.CANCELLED
    assert "by force" in store.outcomes[0].error


async def test_abort_gives_running_items_back() -> None:
    started = asyncio.Event()

    async def long(params: dict[str, Any], ctx: ItemContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    store = MemoryStore(5)
    runner = runner_for(store, long, 2)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.sleep(0)
    runner.abort()
    await asyncio.wait_for(task, TIMEOUT)
    assert sorted(store.released) == [0, 1]
    assert store.outcomes == {}
    assert len(store.pending) == 3


async def test_item_timeout_fails_the_item() -> None:
    async def hangs(params: dict[str, Any], ctx: ItemContext) -> None:
        await asyncio.Event().wait()

    store = MemoryStore(2)
    await asyncio.wait_for(runner_for(store, hangs, 2, item_timeout=0.05).run(), TIMEOUT)
    assert store.count(ItemStatus.FAILED) == 2
    assert "Timed out" in store.outcomes[0].error


async def test_sync_handlers_run_in_the_bounded_pool_off_the_loop() -> None:
    threads: set[str] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def blocking(params: dict[str, Any], ctx: ItemContext) -> int:
        with lock:
            threads.add(threading.current_thread().name)
        if params["i"] < 2:
            barrier.wait()  # both of the first two run at once, on two pool threads
        return int(params["i"])

    store = MemoryStore(10)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pool")
    await asyncio.wait_for(runner_for(store, blocking, 2, is_async=False, executor=pool).run(), TIMEOUT)
    assert store.count(ItemStatus.SUCCEEDED) == 10
    assert threading.current_thread().name not in threads
    assert len(threads) == 2


async def test_resize_while_running_changes_the_cap() -> None:
    limiter = Limiter(4)
    for _ in range(4):
        assert limiter.try_acquire()
    assert not limiter.try_acquire()
    limiter.resize(2)
    limiter.release()
    limiter.release()
    assert not limiter.try_acquire(), "shrinking to 2 with 2 still held leaves no free slot"
    limiter.release()
    assert limiter.try_acquire()
    limiter.resize(5)
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]


async def test_shrinking_takes_free_slots_at_once() -> None:
    limiter = Limiter(4)
    limiter.resize(1)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()


# --- regressions found in review ----------------------------------------------------------


class FailingClaimStore(MemoryStore):
    async def claim(self, limit: int) -> Claim:
        raise RuntimeError("claim failed")


async def test_a_failed_claim_gives_back_every_slot() -> None:
    shared = Limiter(2)
    runner = runner_for(FailingClaimStore(5), Probe(gate_at=1), 2, worker_slots=shared)
    with pytest.raises(ExceptionGroup):
        await asyncio.wait_for(runner.run(), TIMEOUT)
    assert [shared.try_acquire(), shared.try_acquire()] == [True, True]


async def test_cancelling_the_run_gives_items_back_instead_of_cancelling_them() -> None:
    started = asyncio.Event()

    async def long(params: dict[str, Any], ctx: ItemContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    store = MemoryStore(4)
    task = asyncio.create_task(runner_for(store, long, 2).run())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert sorted(store.released) == [0, 1]
    assert store.outcomes == {}


async def test_nul_characters_never_reach_the_database() -> None:
    async def nul(params: dict[str, Any], ctx: ItemContext) -> dict[str, str]:
        if params["i"] == 0:
            raise ValueError("bad\x00byte")
        return {"text": "a\x00b"}

    store = MemoryStore(2)
    await asyncio.wait_for(runner_for(store, nul, 2).run(), TIMEOUT)
    assert store.outcomes[0].error == "ValueError: bad\\x00byte"
    assert store.outcomes[1].status == ItemStatus.FAILED
    assert "NUL" in store.outcomes[1].error


class ReclaimStore(MemoryStore):
    """Reports one more pending item until the second attempt of item 0 has been claimed."""

    async def claim(self, limit: int) -> Claim:
        claim = await super().claim(limit)
        reclaimed = any(item.attempt == 2 for item in claim.items)
        self.served_second = getattr(self, "served_second", False) or reclaimed
        return Claim(items=claim.items, pending=claim.pending or int(not self.served_second), status=claim.status)


async def test_an_item_reclaimed_while_its_old_attempt_runs_here_replaces_it() -> None:
    """Renewals failed, the lease expired and the item came back to this worker: the old
    attempt stops silently, only the new one runs on and records the outcome."""
    store = ReclaimStore(1)
    first_started = asyncio.Event()
    old_attempt_cancelled = asyncio.Event()

    async def handler(params: dict[str, Any], ctx: ItemContext) -> dict[str, int]:
        if ctx.attempt == 1:
            store.pending.append(ClaimedItem(id=0, index=0, params={"i": 0}, attempt=2))
            first_started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                old_attempt_cancelled.set()
                raise
        return {"attempt": ctx.attempt}

    await asyncio.wait_for(runner_for(store, handler, 2).run(), TIMEOUT)
    assert old_attempt_cancelled.is_set()
    assert store.outcomes[0].result == {"attempt": 2}
    assert store.released == []


# --- reservations and handovers ---------------------------------------------------------------


class ReservingStore(MemoryStore):
    """A MemoryStore that also reserves: a claim takes the store's own reserved items first,
    every write tops the reservations up to `reserve_target`, and `events` records the order
    of handovers and completions."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.reserved: list[ClaimedItem] = []
        self.events: list[tuple[str, int]] = []
        self.closed = False

    def _top_up(self, started: int = 0) -> None:
        if not self.closed and self.status == "running":
            wanted = max(0, self.reserve_target + self.reserve_depth * started - len(self.reserved))
            self.reserved += self.pending[:wanted]
            self.pending = self.pending[wanted:]

    async def claim(self, limit: int) -> Claim:
        self.claims.append(limit)
        if self.status != "running":
            return Claim(items=[], pending=0, status=self.status)
        own = min(limit, len(self.reserved))
        taken, self.reserved = self.reserved[:own], self.reserved[own:]
        fresh, self.pending = self.pending[: limit - own], self.pending[limit - own :]
        self._top_up(started=len(taken) + len(fresh))
        return Claim(items=taken + fresh, pending=len(self.pending) + len(self.reserved), status=self.status)

    def enqueue(self, outcomes: list[Outcome]) -> None:
        self.events += [("complete", o.item_id) for o in outcomes]
        super().enqueue(outcomes)
        self._top_up()

    def take_reserved(self) -> ClaimedItem | None:
        if self.closed or not self.reserved:
            return None
        item = self.reserved.pop(0)
        self.events.append(("handover", item.id))
        return item

    def reserved_item_ids(self) -> list[int]:
        return [item.id for item in self.reserved]

    async def trim(self, keep: int) -> None:
        while len(self.reserved) > keep:  # unreserved: pending again, first in line
            self.pending.insert(0, self.reserved.pop())

    async def close(self) -> None:
        self.closed = True
        self.released += self.reserved_item_ids()
        self.reserved = []


async def test_handovers_keep_the_cap_exact_and_ride_with_the_completion_they_replace() -> None:
    store, probe = ReservingStore(60), Probe(gate_at=3)
    runner = runner_for(store, probe, 3)
    await asyncio.wait_for(runner.run(), TIMEOUT)
    assert probe.peak == 3
    assert store.count(ItemStatus.SUCCEEDED) == 60 and probe.calls == 60
    handovers = [i for i, (kind, _) in enumerate(store.events) if kind == "handover"]
    assert len(handovers) > 30, "most slots went from one item to the next without a claim"
    assert len(store.claims) < 20
    for i in handovers:  # queued together, before anything could be written alone
        assert store.events[i + 1][0] == "complete"


async def test_fast_items_reserve_deeper_slow_ones_one_per_slot() -> None:
    fast_targets: list[int] = []

    async def instant(params: dict[str, Any], ctx: ItemContext) -> None:
        fast_targets.append(fast.reserve_target)

    fast = ReservingStore(200)
    await asyncio.wait_for(runner_for(fast, instant, 4).run(), TIMEOUT)
    assert max(fast_targets) == 4 * MAX_DEPTH, "instant items: the deepest reservation per slot"
    assert fast.count(ItemStatus.SUCCEEDED) == 200

    targets: list[int] = []

    async def slow(params: dict[str, Any], ctx: ItemContext) -> None:
        await asyncio.sleep(0.03)
        targets.append(slow_store.reserve_target)

    slow_store = ReservingStore(12)
    await asyncio.wait_for(runner_for(slow_store, slow, 4).run(), TIMEOUT)
    assert max(targets) <= 4, "30 ms items: one reserved item per slot"
    assert slow_store.count(ItemStatus.SUCCEEDED) == 12


async def test_after_cancel_nothing_is_handed_over_and_reservations_go_back() -> None:
    started = asyncio.Event()

    async def waits(params: dict[str, Any], ctx: ItemContext) -> None:
        started.set()
        while not ctx.cancelled:
            await asyncio.sleep(0.001)
        ctx.raise_if_cancelled()

    store = ReservingStore(20)
    runner = runner_for(store, waits, 2)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    held = store.reserved_item_ids()
    assert held, "the first claim reserved items for the two slots"
    runner.cancel()
    await asyncio.wait_for(task, TIMEOUT)
    assert not any(kind == "handover" for kind, _ in store.events)
    assert store.count(ItemStatus.CANCELLED) == 2
    assert store.closed and store.released == held


async def test_a_batch_waiting_for_worker_slots_gets_them_despite_handovers() -> None:
    shared = Limiter(2)
    order: list[str] = []

    def recorder(name: str) -> Any:
        async def run(params: dict[str, Any], ctx: ItemContext) -> None:
            order.append(name)
            await asyncio.sleep(0)

        return run

    first, second = ReservingStore(40), ReservingStore(5)
    one = runner_for(first, recorder("first"), 2, worker_slots=shared)
    two = runner_for(second, recorder("second"), 2, worker_slots=shared)
    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
        group.create_task(one.run())
        await asyncio.sleep(0)
        group.create_task(two.run())
    assert order.index("second") < order.index("first") + 10, "the second batch was not starved"
    assert len(first.outcomes) == 40 and len(second.outcomes) == 5


async def test_a_handlers_own_timeout_error_is_a_failure_not_the_item_timeout() -> None:
    async def raises(params: dict[str, Any], ctx: ItemContext) -> None:
        raise TimeoutError("upstream took too long")

    for timeout in (None, 30.0):
        store = MemoryStore(1)
        await asyncio.wait_for(runner_for(store, raises, 1, item_timeout=timeout).run(), TIMEOUT)
        assert store.outcomes[0].error == "TimeoutError: upstream took too long"


async def test_the_item_timeout_fails_the_item() -> None:
    async def slow(params: dict[str, Any], ctx: ItemContext) -> None:
        await asyncio.sleep(3600)

    store = MemoryStore(1)
    await asyncio.wait_for(runner_for(store, slow, 1, item_timeout=0.01).run(), TIMEOUT)
    assert (store.outcomes[0].status, store.outcomes[0].error) == (ItemStatus.FAILED, "Timed out after 0.01 s.")


async def test_a_crashed_run_gives_its_reservations_back() -> None:
    class CrashingStore(ReservingStore):
        async def claim(self, limit: int) -> Claim:
            if self.claims:
                raise RuntimeError("the database went away for good")
            return await super().claim(limit)

    async def quick(params: dict[str, Any], ctx: ItemContext) -> None:
        await asyncio.sleep(0)

    store = CrashingStore(10)
    store.reserve_target = 2
    with pytest.raises(ExceptionGroup):
        await asyncio.wait_for(runner_for(store, quick, 2).run(), TIMEOUT)
    assert store.closed


async def test_a_worker_share_frees_the_slots_above_it_and_handovers_resume_at_it() -> None:
    """Another worker waits for the cap (the store reports a share of 2): of 4 running items,
    the first two to finish are not replaced; after that every finished item is again."""
    gates = {i: asyncio.Event() for i in range(40)}
    running: set[int] = set()
    peak_after_share = 0

    async def held(params: dict[str, Any], ctx: ItemContext) -> None:
        nonlocal peak_after_share
        running.add(params["i"])
        if store.share is not None:
            peak_after_share = max(peak_after_share, len(running))
        await gates[params["i"]].wait()
        running.discard(params["i"])

    store = ReservingStore(40)
    store.share = None
    runner = runner_for(store, held, 4)
    task = asyncio.create_task(runner.run())
    async with asyncio.timeout(TIMEOUT):
        while len(running) < 4:
            await asyncio.sleep(0)
        store.share = 2
        for i in sorted(running)[:2]:  # two finish: their slots go, nothing replaces them
            gates[i].set()
            while i in running:
                await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(running) == 2 and runner.parallel == 2
        handed_before = sum(1 for kind, _ in store.events if kind == "handover")
        first = min(running)
        gates[first].set()  # at the share now: this one is replaced by a reserved item
        while first in running:
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(running) == 2
        assert sum(1 for kind, _ in store.events if kind == "handover") == handed_before + 1
        store.share = None  # the other worker got its slots: back to the full cap
        for gate in gates.values():
            gate.set()
        await task
    assert peak_after_share <= 2
    assert runner.parallel == 4
    assert store.count(ItemStatus.SUCCEEDED) == 40
