"""Every stop path holds for plain `def` handlers too: force cancel, item timeout, shutdown.

The handler (`test.proc.beats`) ignores cancellation and appends a heartbeat line to a file per
item about every millisecond, from a worker process. "Stopped" means its file never grows again.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.worker import Worker, WorkerConfig
from tests import process_handlers

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 60  # a worker process and its Django set-up take about a second, more on a busy box

submit = sync_to_async(lambda **kw: services.submit_batch(**kw).batch)


def config(**overrides: Any) -> WorkerConfig:
    assert process_handlers.GATE_LIMIT  # registers test.proc.*
    base = {
        "worker_id": f"test-{uuid.uuid4().hex[:8]}",
        "handle_signals": False,
        "exit_when_idle": False,
        "poll_interval": 0.05,
        "heartbeat_seconds": 0.5,
    }
    return WorkerConfig.from_settings(**{**base, **overrides})


def beats_of(folder: Path) -> dict[int, list[tuple[int, float]]]:
    """(pid, time) heartbeats per item index."""
    found: dict[int, list[tuple[int, float]]] = {}
    for path in folder.iterdir():
        lines = [line.split() for line in path.read_text().splitlines() if line.count(" ") == 1]
        found[int(path.name)] = [(int(pid), float(at)) for pid, at in lines]
    return found


def sizes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in folder.iterdir()}


async def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def assert_stopped(folder: Path) -> None:
    """No handler writes any more, and every process that ran one is gone."""
    before = sizes(folder)
    await asyncio.sleep(0.3)  # 300 heartbeats' time: any live handler would have written
    assert sizes(folder) == before, "a handler still runs"
    pids = {pid for beats in beats_of(folder).values() for pid, _ in beats}
    assert not any(pid_alive(pid) for pid in pids)


async def test_force_cancel_stops_sync_handlers_before_the_batch_is_cancelled(settings: Any, tmp_path: Path) -> None:
    settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS = 0.5
    batch = await submit(handler="test.proc.beats", items=[{"dir": str(tmp_path)}] * 2, max_parallel=2)
    worker = Worker(config())
    run = asyncio.ensure_future(worker.run())
    try:
        await wait_for(lambda: asyncio.sleep(0, len(list(tmp_path.iterdir())) == 2))
        await sync_to_async(services.request_cancel)(batch_id=batch.pk)

        async def cancelled() -> bool:
            return (await BatchJob.objects.aget(pk=batch.pk)).status == BatchStatus.CANCELLED

        await wait_for(cancelled)
        await assert_stopped(tmp_path)  # "cancelled" means no handler runs any more
        items = [i async for i in BatchJobItem.objects.filter(batch=batch)]
        assert {i.status for i in items} == {ItemStatus.CANCELLED}
        assert all("by force" in i.error for i in items)
    finally:
        worker.stop()
        worker.stop()
        await asyncio.wait_for(run, TIMEOUT)


async def test_item_timeout_stops_a_sync_handler_and_frees_its_slot(tmp_path: Path) -> None:
    """With a cap of 2, four items that each ignore their 0.5 s timeout: each is stopped, the
    next starts only after, so never more than two handlers run at once."""
    items = [{"dir": str(tmp_path), "seconds": 30}] * 4
    batch = await submit(handler="test.proc.beats", items=items, max_parallel=2)
    worker = Worker(config(item_timeout=0.5, exit_when_idle=True))
    await asyncio.wait_for(worker.run(), TIMEOUT)
    batch = await BatchJob.objects.aget(pk=batch.pk)
    assert (batch.status, batch.failed_items) == (BatchStatus.FAILED, 4)
    errors = {i.error async for i in BatchJobItem.objects.filter(batch=batch)}
    assert errors == {"Timed out after 0.5 s."}
    await assert_stopped(tmp_path)
    spans = sorted((beats[0][1], beats[-1][1]) for beats in beats_of(tmp_path).values())
    for began, _ in spans:
        assert sum(1 for b, e in spans if b <= began <= e) <= 2, f"more than 2 handlers at once: {spans}"
    for _, (first, last) in zip(range(4), spans, strict=True):
        assert last - first < 5, "the handler ran on past its timeout"


async def test_shutdown_past_its_drain_stops_sync_handlers_and_gives_items_back(tmp_path: Path) -> None:
    batch = await submit(handler="test.proc.beats", items=[{"dir": str(tmp_path)}] * 2, max_parallel=2)
    worker = Worker(config(drain_timeout=0.3))
    run = asyncio.ensure_future(worker.run())
    await wait_for(lambda: asyncio.sleep(0, len(list(tmp_path.iterdir())) == 2))
    worker.stop()
    await asyncio.wait_for(run, TIMEOUT)
    await assert_stopped(tmp_path)  # before another worker could take the items, they stopped here
    batch = await BatchJob.objects.aget(pk=batch.pk)
    assert (batch.running_items, batch.pending_items) == (0, 2)
    assert {i.attempts async for i in BatchJobItem.objects.filter(batch=batch)} == {0}


async def test_cpu_bound_sync_handlers_run_in_several_processes(tmp_path: Path) -> None:
    items = [{"dir": str(tmp_path), "seconds": 0.3}] * 4
    batch = await submit(handler="test.proc.beats", items=items, max_parallel=4)
    await asyncio.wait_for(Worker(config(exit_when_idle=True)).run(), TIMEOUT)
    batch = await BatchJob.objects.aget(pk=batch.pk)
    assert batch.status == BatchStatus.SUCCEEDED
    pids = {pid for beats in beats_of(tmp_path).values() for pid, _ in beats}
    assert len(pids) >= 2 and os.getpid() not in pids  # off the worker's process, on several
    assert time.time() > 0


@pytest.mark.postgres
@pytest.mark.slow
def test_sigterm_never_leaves_one_item_running_on_two_workers(start_worker: Any, tmp_path: Path) -> None:
    """Two `runbatch` processes at concurrency 1, one 4 s sync item that ignores cancellation:
    SIGTERM to the worker running it, drain 0.5 s. Its handler process is killed before the
    item goes back, so the other worker's run of it starts after the last heartbeat of the
    first (before: the first worker's thread ran on for 4 s beside the second's run)."""
    from tests.cluster_support import wait_until

    env = {"BATCH_HANDLER_MODULES": "tests.process_handlers", "BATCH_WORKER_CONCURRENCY": "1"}
    folder = tmp_path / "beats"
    folder.mkdir()
    batch = services.submit_batch(handler="test.proc.beats", items=[{"dir": str(folder), "seconds": 4}]).batch
    first = start_worker("--drain-timeout", "0.5", env=env)
    wait_until(lambda: (folder / "0").exists(), timeout=60, what="the first worker to run the item")
    second = start_worker("--drain-timeout", "0.5", env=env)
    first.terminate()
    assert first.wait(timeout=30) == 0
    beats_after_exit = len(beats_of(folder)[0])
    batch.refresh_from_db()
    wait_until(lambda: BatchJob.objects.get(pk=batch.pk).status == BatchStatus.SUCCEEDED, timeout=60, what="the batch")
    second.terminate()
    second.wait(timeout=30)
    beats = beats_of(folder)[0]
    pids = list(dict.fromkeys(pid for pid, _ in beats))
    assert len(pids) == 2, "two runs: the stopped one and the one that finished"
    first_run = [at for pid, at in beats if pid == pids[0]]
    second_run = [at for pid, at in beats if pid == pids[1]]
    assert max(first_run) < min(second_run), "the item ran on two workers at once"
    assert len([b for b in beats[:beats_after_exit] if b[0] == pids[1]]) == 0
    assert BatchJobItem.objects.get(batch=batch).attempts == 1  # the stopped run was given back, not counted
