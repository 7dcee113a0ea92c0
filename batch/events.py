"""Fan-out of batch state changes to the live dashboard through the Channels layer.

`batch.services` sends `batch_changed` after every committed change, in whatever process
and thread made it (the worker's sync database thread, a web request, a command). The
receiver only records the batch and item ids as dirty; a background thread flushes them at
most once per `FLUSH_INTERVAL` (0.25 s): it reads the current rows and publishes

- one `batch.updated` per dirty batch to the groups `batches` and `batch.<id>`, and
- up to `ITEMS_PER_FLUSH` (20) `item.updated` of its most recently changed items (failures
  first) to `batch.<id>`.

The `batch.updated` sent to `batch.<id>` also carries `recent_durations`: `[item_id, seconds]`
of every changed item that finished (succeeded or failed) since the last flush (up to
`MAX_DIRTY_ITEMS`), so the dashboard's duration histogram is not limited to the 20 items.

So each process sends at most 4 `batch.updated` per batch per second, whatever the item
rate, and because every flush reads the rows after the last change it saw, the last message
of a batch always carries its final state. Publishing never raises into the services: errors
are logged and the dirty state is dropped.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import close_old_connections, connection
from django.dispatch import receiver

from batch.models import BatchJob, BatchJobItem, ItemStatus
from batch.payloads import batch_payload, item_payload
from batch.signals import batch_changed

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.25  # seconds between flushes: at most 4 batch.updated per batch per second
ITEMS_PER_FLUSH = 20  # item.updated per batch per flush
MAX_DIRTY_ITEMS = 200  # item ids remembered per batch between flushes
SEND_TIMEOUT = 5.0
BATCHES_GROUP = "batches"

Message = tuple[str, dict[str, Any]]


def batch_group(batch_id: uuid.UUID | str) -> str:
    return f"batch.{batch_id}"


class Publisher:
    """Coalesces `batch_changed` per batch and publishes from one background thread."""

    def __init__(self, interval: float = FLUSH_INTERVAL) -> None:
        self.interval = interval
        self.sent = 0  # channel-layer group sends, for tests and logs
        self._lock = threading.Lock()
        self._dirty: dict[uuid.UUID, OrderedDict[int, None]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local_loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver in-memory layer messages on `loop`, where this process's consumers run."""
        self._local_loop = loop

    def mark(self, batch_id: uuid.UUID, item_ids: Iterable[int]) -> None:
        """Record a change; cheap and non-blocking (called on the services' hot path)."""
        if not self._has_listeners():
            return
        with self._lock:
            items = self._dirty.setdefault(batch_id, OrderedDict())
            for item_id in item_ids:
                items[item_id] = None
                items.move_to_end(item_id)
            while len(items) > MAX_DIRTY_ITEMS:
                items.popitem(last=False)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="batch-events", daemon=True)
                self._thread.start()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is dirty and stop the thread (at interpreter exit)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _has_listeners(self) -> bool:
        layer = get_channel_layer()
        if layer is None:
            return False
        if isinstance(layer, InMemoryChannelLayer):
            return self._delivery_loop() is not None
        return True

    def _delivery_loop(self) -> asyncio.AbstractEventLoop | None:
        loop = self._local_loop
        return loop if loop is not None and not loop.is_closed() else None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while not (self._stop.is_set() and not self._dirty):
                self._wake.wait()
                self._wake.clear()
                self.flush(loop)
                self._stop.wait(self.interval)
        finally:
            loop.close()

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        if not dirty:
            return
        try:
            messages = self._messages(dirty)
            self._deliver(loop, messages)
        except Exception:
            logger.exception("publishing batch events failed", extra={"batches": len(dirty)})

    def _messages(self, dirty: dict[uuid.UUID, OrderedDict[int, None]]) -> list[Message]:
        close_old_connections()
        try:
            batches = list(BatchJob.objects.select_related("created_by").filter(pk__in=list(dirty)))
            messages: list[Message] = []
            for batch in batches:
                # Items first: when a client sees the batch's final state, its items are in.
                items = _changed_items(list(dirty[batch.pk]))
                if items:
                    messages.append((batch_group(batch.pk), {"type": "batch.items", "items": items}))
                payload = batch_payload(batch)
                detail = {**payload, "recent_durations": _finished_durations(list(dirty[batch.pk]))}
                messages.append((batch_group(batch.pk), {"type": "batch.updated", "batch": detail}))
                messages.append((BATCHES_GROUP, {"type": "batch.updated", "batch": payload}))
            return messages
        finally:
            connection.close()

    def _deliver(self, loop: asyncio.AbstractEventLoop, messages: list[Message]) -> None:
        layer = get_channel_layer()
        if layer is None or not messages:
            return
        if isinstance(layer, InMemoryChannelLayer):
            target = self._delivery_loop()
            if target is not None:
                asyncio.run_coroutine_threadsafe(_send_all(layer, messages), target)
        else:
            loop.run_until_complete(asyncio.wait_for(_send_all(layer, messages), SEND_TIMEOUT))
        self.sent += len(messages)


async def _send_all(layer: Any, messages: list[Message]) -> None:
    for group, message in messages:
        await layer.group_send(group, message)


def _finished_durations(item_ids: list[int]) -> list[list[float]]:
    """`[item_id, seconds]` of the items of `item_ids` that ran and finished (succeeded or failed)."""
    if not item_ids:
        return []
    rows = BatchJobItem.objects.filter(
        pk__in=item_ids,
        status__in=[ItemStatus.SUCCEEDED, ItemStatus.FAILED],
        started_at__isnull=False,
        finished_at__isnull=False,
    ).values_list("pk", "started_at", "finished_at")
    return [
        [pk, round(max(0.0, (finished - started).total_seconds()), 4)]
        for pk, started, finished in rows
        if started is not None and finished is not None
    ]


def _changed_items(item_ids: list[int]) -> list[dict[str, Any]]:
    """The most recently changed items of `item_ids` (last = newest), failures first."""
    if not item_ids:
        return []
    recent = item_ids[-ITEMS_PER_FLUSH * 4 :]
    rows = {item.pk: item for item in BatchJobItem.objects.filter(pk__in=recent)}
    ordered = [rows[pk] for pk in reversed(recent) if pk in rows]
    ordered.sort(key=lambda item: item.status != ItemStatus.FAILED)
    return [item_payload(item) for item in reversed(ordered[:ITEMS_PER_FLUSH])]


publisher = Publisher()
atexit.register(publisher.stop)


@receiver(batch_changed, dispatch_uid="batch.events.publish")
def on_batch_changed(sender: object, *, batch_id: uuid.UUID, item_ids: Iterable[int] = (), **kwargs: Any) -> None:
    try:
        publisher.mark(batch_id, item_ids)
    except Exception:
        logger.exception("could not record a batch event", extra={"batch_id": str(batch_id)})
