"""SyncProcessPool: sync handlers in worker processes that can be killed (real processes)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from batch.handlers import ItemCancelled, ItemContext, get_handler
from batch.processes import HandlerCrashed, HandlerError, HandlerTimeout, SyncProcessPool
from tests import process_handlers

TIMEOUT = 30  # seconds; spawning a process and setting Django up takes about one
BATCH_ID = uuid.uuid4()


def start(
    pool: SyncProcessPool,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    cancel_event: asyncio.Event | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    timeout: float | None = None,
    item_id: int = 1,
) -> asyncio.Task[Any]:
    assert process_handlers.GATE_LIMIT  # the module registers the handlers
    coroutine = pool.call(
        handler=get_handler(name),
        params=params or {},
        batch_id=BATCH_ID,
        item_id=item_id,
        index=item_id - 1,
        attempt=1,
        cancel_event=cancel_event or asyncio.Event(),
        on_progress=on_progress,
        timeout=timeout,
    )
    return asyncio.ensure_future(coroutine)


async def call(pool: SyncProcessPool, name: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return await finish(start(pool, name, params, **kwargs))


async def finish(task: asyncio.Task[Any]) -> Any:
    """The task's result, failing fast on a hang."""
    return await asyncio.wait_for(task, TIMEOUT)


def progress_gate() -> tuple[asyncio.Event, list[tuple[float, str]], Callable[[float, str], None]]:
    """An Event set by the first progress report, and the list of all reports."""
    reported = asyncio.Event()
    reports: list[tuple[float, str]] = []

    def on_progress(fraction: float, message: str) -> None:
        reports.append((fraction, message))
        reported.set()

    return reported, reports, on_progress


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def pool() -> AsyncIterator[SyncProcessPool]:
    pool = SyncProcessPool(1)
    yield pool
    await asyncio.wait_for(pool.close(), TIMEOUT)


@pytest.fixture
async def pool2() -> AsyncIterator[SyncProcessPool]:
    pool = SyncProcessPool(2)
    yield pool
    await asyncio.wait_for(pool.close(), TIMEOUT)


async def test_result_and_context_come_back_and_the_process_is_reused(pool: SyncProcessPool) -> None:
    big = {"n": 1, "blob": "x" * 200_000}  # more than a pipe holds: sent from a thread
    first = await call(pool, "test.proc.echo", big, item_id=5)
    second = await call(pool, "test.proc.echo", {"n": 2}, item_id=6)

    assert first["params"] == big
    assert first["ctx"] == [BATCH_ID, 5, 4, 1, False]
    assert second["params"] == {"n": 2}
    assert first["pid"] == second["pid"] != os.getpid()


@pytest.mark.django_db(transaction=True)
async def test_child_uses_the_parents_test_database_and_closes_its_connection(pool: SyncProcessPool) -> None:
    from django.conf import settings
    from django.contrib.auth.models import User

    await User.objects.acreate(username="seen-by-child")

    first = await call(pool, "test.proc.database", {"username": "seen-by-child"})
    second = await call(pool, "test.proc.database", {"username": "nobody"})

    assert first["name"] == str(settings.DATABASES["default"]["NAME"])
    assert first["user_exists"] is True
    assert second["user_exists"] is False
    assert first["pid"] == second["pid"]
    assert second["connection_open_before"] is False  # closed after the first item


async def test_cooperative_cancel_reaches_the_child_with_progress_on_the_way(pool: SyncProcessPool) -> None:
    for name, expected in (("test.proc.until_cancelled", "saw cancel"), ("test.proc.wait", ItemCancelled)):
        cancel = asyncio.Event()
        reported, reports, on_progress = progress_gate()
        task = start(pool, name, {"seconds": 600}, cancel_event=cancel, on_progress=on_progress)
        await asyncio.wait_for(reported.wait(), TIMEOUT)
        cancel.set()
        if expected is ItemCancelled:
            with pytest.raises(ItemCancelled):
                await finish(task)  # ctx.wait(600) woke at once
            assert reports == [(0.25, "waiting")]
        else:
            assert await finish(task) == expected
            assert reports == [(0.5, "spinning")]


async def test_handler_exceptions_come_back_as_themselves_or_as_handler_error(pool: SyncProcessPool) -> None:
    with pytest.raises(ValueError, match=r"^bad value 42$"):
        await call(pool, "test.proc.fail", {"kind": "value"})
    with pytest.raises(TimeoutError, match="the handler's own timeout") as own:
        await call(pool, "test.proc.fail", {"kind": "timeout"}, timeout=60)
    assert not isinstance(own.value, HandlerTimeout)
    with pytest.raises(ItemCancelled):
        await call(pool, "test.proc.fail", {"kind": "cancelled"})
    with pytest.raises(HandlerError) as not_rebuilt:
        await call(pool, "test.proc.fail", {"kind": "unpicklable_error"})
    assert (not_rebuilt.value.type_name, not_rebuilt.value.message) == ("NeedsTwoArguments", "7: odd")
    with pytest.raises(HandlerError, match="cannot be sent back"):
        await call(pool, "test.proc.fail", {"kind": "unpicklable_result"})
    assert (await call(pool, "test.proc.echo"))["params"] == {}  # the process served on


async def test_cancelled_call_returns_only_after_its_process_is_dead(pool: SyncProcessPool, tmp_path: Path) -> None:
    beats = tmp_path / "beats"
    reported, reports, on_progress = progress_gate()
    task = start(pool, "test.proc.heartbeat", {"path": str(beats)}, on_progress=on_progress)
    await asyncio.wait_for(reported.wait(), TIMEOUT)
    pid = int(reports[0][1])

    task.cancel()
    await asyncio.sleep(0)  # the call starts killing; a second cancel must not cut its wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finish(task)

    assert not alive(pid)
    last = beats.read_text()
    await asyncio.sleep(0.1)
    assert beats.read_text() == last
    assert (await call(pool, "test.proc.echo"))["pid"] not in (pid, os.getpid())


async def test_timeout_kills_the_handler_and_raises_handler_timeout(pool: SyncProcessPool, tmp_path: Path) -> None:
    _, reports, on_progress = progress_gate()
    task = start(pool, "test.proc.heartbeat", {"path": str(tmp_path / "beats")}, on_progress=on_progress, timeout=0.5)

    with pytest.raises(HandlerTimeout) as timed_out:
        await finish(task)

    assert timed_out.value.seconds == 0.5
    assert isinstance(timed_out.value, TimeoutError)
    assert not alive(int(reports[0][1]))


async def test_waiting_for_a_free_process_does_not_count_toward_the_timeout(
    pool: SyncProcessPool, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    reported, _, on_progress = progress_gate()
    holder = start(pool, "test.proc.gate", {"release": str(release)}, on_progress=on_progress)
    await asyncio.wait_for(reported.wait(), TIMEOUT)

    waiter = start(pool, "test.proc.echo", timeout=0.3)
    await asyncio.sleep(0.6)  # twice its timeout spent waiting for the only process
    release.touch()

    pid = await finish(holder)
    assert (await finish(waiter))["pid"] == pid


async def test_process_that_dies_fails_its_item_and_is_replaced(pool: SyncProcessPool) -> None:
    before = (await call(pool, "test.proc.echo"))["pid"]

    with pytest.raises(HandlerCrashed, match="exit code 3"):
        await call(pool, "test.proc.fail", {"kind": "exit", "code": 3})

    assert not alive(before)
    assert (await call(pool, "test.proc.echo"))["pid"] != before


async def test_two_calls_run_at_the_same_time_in_two_processes(pool2: SyncProcessPool, tmp_path: Path) -> None:
    params = {"folder": str(tmp_path), "parties": 2}
    first = start(pool2, "test.proc.rendezvous", params, item_id=1)
    second = start(pool2, "test.proc.rendezvous", params, item_id=2)

    pids = {await finish(first), await finish(second)}  # each returns only once both have arrived

    assert len(pids) == 2
    assert pids == {int(p.name) for p in tmp_path.iterdir()}


async def test_close_ends_idle_and_busy_processes_and_is_idempotent(pool2: SyncProcessPool, tmp_path: Path) -> None:
    idle = (await call(pool2, "test.proc.echo"))["pid"]
    reported, reports, on_progress = progress_gate()
    busy = start(pool2, "test.proc.heartbeat", {"path": str(tmp_path / "beats")}, on_progress=on_progress)
    await asyncio.wait_for(reported.wait(), TIMEOUT)

    await asyncio.wait_for(pool2.close(), TIMEOUT)

    assert not alive(idle)
    assert not alive(int(reports[0][1]))
    with pytest.raises(HandlerCrashed, match="pool was closed"):
        await finish(busy)
    await asyncio.wait_for(pool2.close(), TIMEOUT)
    with pytest.raises(RuntimeError, match="closed"):
        await call(pool2, "test.proc.echo")


async def test_ctx_wait_also_wakes_on_a_loops_event_in_a_thread() -> None:
    cancel = asyncio.Event()
    ctx = ItemContext(batch_id=BATCH_ID, item_id=1, index=0, attempt=1, cancel_event=cancel)
    waiting = asyncio.ensure_future(asyncio.to_thread(ctx.wait, 600))
    await asyncio.sleep(0.05)
    cancel.set()

    with pytest.raises(ItemCancelled):
        await finish(waiting)
    ctx.cancel_event = threading.Event()
    with pytest.raises(TypeError, match=r"ctx\.wait"):
        await ctx.sleep(1)


def test_fork_is_refused() -> None:
    with pytest.raises(ValueError, match="spawn"):
        SyncProcessPool(1, start_method="fork")
