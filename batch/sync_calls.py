"""How a worker runs sync (`def`) handlers: the interface the runner calls, and threads.

Sync handlers run in worker processes that can be killed (`batch.processes`), so a force
cancel, an item timeout or the end of a shutdown's drain really stops them. `ThreadCalls` is
for handlers registered with `isolation="thread"` (they cannot leave the worker process): a
thread cannot be stopped, so its item keeps its slot and its lease until the thread returns.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol

from django.conf import settings

from batch.handlers import HandlerSpec, ItemContext
from batch.processes import HandlerTimeout, SyncProcessPool

__all__ = ["HandlerTimeout", "SyncCalls", "SyncDispatch", "ThreadCalls", "sync_calls_for_worker"]


class SyncCalls(Protocol):
    async def call(
        self,
        *,
        handler: HandlerSpec,
        params: dict[str, Any],
        batch_id: uuid.UUID,
        item_id: int,
        index: int,
        attempt: int,
        cancel_event: asyncio.Event,
        on_progress: Callable[[float, str], None] | None = None,
        item_timeout: float | None = None,
    ) -> Any:
        """Run `handler`; return when it has really stopped (also when the awaiting task is
        cancelled, which stops it by force where it can be stopped)."""
        ...

    async def close(self) -> None: ...


class ThreadCalls:
    """Sync handlers on a bounded thread pool; a call returns only once its thread has."""

    def __init__(self, size: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="batch-handler")

    async def call(
        self,
        *,
        handler: HandlerSpec,
        params: dict[str, Any],
        batch_id: uuid.UUID,
        item_id: int,
        index: int,
        attempt: int,
        cancel_event: asyncio.Event,
        on_progress: Callable[[float, str], None] | None = None,
        item_timeout: float | None = None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        ctx = ItemContext(batch_id=batch_id, item_id=item_id, index=index, attempt=attempt, cancel_event=cancel_event)
        if on_progress is not None:
            report = on_progress

            def progress(c: ItemContext) -> None:
                loop.call_soon_threadsafe(report, c.progress_fraction, c.progress_message)

            ctx._on_progress = progress
        began: list[float] = []

        def run() -> Any:
            began.append(time.monotonic())
            return handler.call_sync(params, ctx)

        future = loop.run_in_executor(self._executor, partial(run))
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                cancelled = True  # the thread cannot be stopped: keep the slot until it returns
        if cancelled:
            raise asyncio.CancelledError
        result = future.result()
        if item_timeout is not None and began and time.monotonic() - began[0] > item_timeout:
            raise HandlerTimeout(item_timeout)
        return result

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SyncDispatch:
    """Each sync handler to the pool its `isolation` names: killable processes or threads."""

    def __init__(self, *, processes: SyncProcessPool, threads: ThreadCalls) -> None:
        self._processes = processes
        self._threads = threads

    async def call(self, *, handler: HandlerSpec, item_timeout: float | None = None, **kwargs: Any) -> Any:
        if handler.isolation == "thread":
            return await self._threads.call(handler=handler, item_timeout=item_timeout, **kwargs)
        return await self._processes.call(handler=handler, timeout=item_timeout, **kwargs)

    async def close(self) -> None:
        await self._processes.close()
        await self._threads.close()


def sync_calls_for_worker(concurrency: int) -> SyncDispatch:
    """Killable processes for sync handlers (BATCH_SYNC_PROCESSES, default the worker's
    concurrency, started as needed), threads for those registered with isolation="thread"."""
    size = settings.BATCH_SYNC_PROCESSES or concurrency
    return SyncDispatch(processes=SyncProcessPool(size), threads=ThreadCalls(concurrency))
