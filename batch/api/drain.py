"""Wait, without holding a thread, until a cancelling batch has drained.

The waiter re-reads the one batch row when woken: on PostgreSQL by `notify.control_watcher`
(the services' `pg_notify` after every change, from any process), in this process also by
the `batch_changed` signal; polling is the fallback that always works (SQLite: every 0.25 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async

from batch.models import BatchJob, BatchStatus
from batch.notify import control_watcher
from batch.signals import batch_changed

POLL_SECONDS = 0.25  # no notifications (SQLite, or the listener is down)
SAFETY_POLL_SECONDS = 1.0  # notifications arrive; poll only in case one was lost


def _on_batch_changed(sender: Any, *, batch_id: uuid.UUID, **kwargs: Any) -> None:
    control_watcher.wake(batch_id)


batch_changed.connect(_on_batch_changed, dispatch_uid="batch.api.drain")


async def wait_while_cancelling(
    batch_id: uuid.UUID, *, fetch: Callable[[], BatchJob | None], seconds: float
) -> BatchJob | None:
    """The batch (from `fetch`, a sync read) once it is no longer cancelling or `seconds` passed.

    None if it disappeared meanwhile.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    read = sync_to_async(fetch)
    with control_watcher.watch(batch_id) as woken:
        while True:
            woken.clear()  # before the read: a change after it will set the event again
            batch = await read()
            remaining = deadline - loop.time()
            if batch is None or batch.status != BatchStatus.CANCELLING or remaining <= 0:
                return batch
            interval = SAFETY_POLL_SECONDS if control_watcher.listening else POLL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=min(remaining, interval))
