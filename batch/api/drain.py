"""Wait, without holding a thread, until a cancelling batch has drained (or a pause settled).

The waiter re-reads the one batch row when woken: on PostgreSQL by `notify.control_watcher`
(the services' `pg_notify` after every change, from any process), in this process also by
the `batch_changed` signal; polling is the fallback that always works (SQLite: every 0.25 s). Between reads the request
holds no database connection (`released`): six waiting cancels once kept six connections of a
pool of four, and every other request waited for the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import connection

from batch import metrics
from batch.models import BatchJob, BatchStatus
from batch.notify import control_watcher
from batch.signals import batch_changed

POLL_SECONDS = 0.25  # no notifications (SQLite, or the listener is down)
SAFETY_POLL_SECONDS = 1.0  # notifications arrive; poll only in case one was lost


def _on_batch_changed(sender: Any, *, batch_id: uuid.UUID, **kwargs: Any) -> None:
    control_watcher.wake(batch_id)


batch_changed.connect(_on_batch_changed, dispatch_uid="batch.api.drain")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def released(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`func` on the request's sync thread, then its connection back (to the pool, or closed).

    Not inside a transaction (a test's): closing there would break it, and nothing waits then.
    """

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                connection.close()

    return sync_to_async(run)


async def wait_while_cancelling(
    batch_id: uuid.UUID, *, fetch: Callable[[], BatchJob | None], seconds: float
) -> BatchJob | None:
    """The batch (from `fetch`, a sync read) once it is no longer cancelling or `seconds` passed.

    None if it disappeared meanwhile.
    """
    began = asyncio.get_running_loop().time()
    batch = await wait_until(batch_id, fetch=fetch, done=lambda b: b.status != BatchStatus.CANCELLING, seconds=seconds)
    waited = asyncio.get_running_loop().time() - began
    metrics.observe_cancel_drain(waited, status=None if batch is None else batch.status)
    return batch


async def wait_until(
    batch_id: uuid.UUID, *, fetch: Callable[[], T | None], done: Callable[[T], bool], seconds: float
) -> T | None:
    """What `fetch` (a sync read) returns once `done` says so or `seconds` passed; None if it
    returned None (the batch disappeared). Re-read when the batch changes, else by polling."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + seconds
    read = released(fetch)
    with control_watcher.watch(batch_id) as woken:
        while True:
            woken.clear()  # before the read: a change after it will set the event again
            value = await read()
            remaining = deadline - loop.time()
            if value is None or done(value) or remaining <= 0:
                return value
            interval = SAFETY_POLL_SECONDS if control_watcher.listening else POLL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=min(remaining, interval))
