"""Event fan-out: coalescing bound, final state always delivered, failures never reach services."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from batch import events, services
from batch.models import BatchStatus
from batch.worker import Worker, WorkerConfig
from tests.test_consumers import TIMEOUT, connected, receive_until, staff_cookie  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

logger = logging.getLogger(__name__)

BOUND_PER_SECOND = round(1 / events.FLUSH_INTERVAL)  # the stated bound: 4 batch.updated per batch per second
ITEMS = 5_000
RUN_TIMEOUT = 240  # 5,000 items take 10-20 s on SQLite, longer on a busy PostgreSQL


def peak_in_any_second(times: list[float]) -> int:
    """The most timestamps that fall inside any window of one second."""
    peak, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 1.0:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


async def test_5000_noop_items_send_a_bounded_rate_and_end_with_the_final_counts(
    connected: Any,  # noqa: F811  (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    published: list[float] = []  # when the publisher sent each batch.updated of the batch's group
    original = events._send_all

    async def recording(layer: Any, messages: list[events.Message]) -> None:
        now = time.monotonic()
        published.extend(now for group, m in messages if group != events.BATCHES_GROUP and m["type"] == "batch.updated")
        await original(layer, messages)

    monkeypatch.setattr(events, "_send_all", recording)
    batch = (await sync_to_async(services.submit_batch)(handler="demo.noop", items=[{}] * ITEMS)).batch
    one = await connected(f"/ws/batches/{batch.pk}/")
    everything = await connected("/ws/batches/")
    await one.receive_json_from(timeout=TIMEOUT)
    await everything.receive_json_from(timeout=TIMEOUT)
    config = WorkerConfig.from_settings(
        worker_id=f"events-{uuid.uuid4().hex[:8]}", handle_signals=False, only_batch=batch.pk, poll_interval=0.05
    )
    started = time.monotonic()
    run = asyncio.create_task(Worker(config).run())
    received: list[tuple[float, dict[str, Any]]] = []

    def record(message: dict[str, Any]) -> bool:
        received.append((time.monotonic(), message))
        return message["type"] == "batch.updated" and message["batch"]["status"] == BatchStatus.SUCCEEDED

    await receive_until(one, record, timeout=RUN_TIMEOUT)
    await asyncio.wait_for(run, RUN_TIMEOUT)
    duration = time.monotonic() - started
    updates = [(t, m["batch"]) for t, m in received if m["type"] == "batch.updated"]
    item_messages = sum(1 for _, m in received if m["type"] == "item.updated")
    peak, received_peak = peak_in_any_second(published), peak_in_any_second([t for t, _ in updates])
    logger.warning(
        "5,000 demo.noop items in %.2fs: %d batch.updated (%.1f/s; peak in one second %d sent, %d received), "
        "%d item.updated",
        duration,
        len(updates),
        len(updates) / duration,
        peak,
        received_peak,
        item_messages,
    )
    assert peak <= BOUND_PER_SECOND
    assert received_peak <= BOUND_PER_SECOND + 1  # delivery jitter can bunch two sends a little
    assert len(updates) == len(published)
    assert len(updates) <= BOUND_PER_SECOND * (duration + 1)
    final = updates[-1][1]
    assert (final["status"], final["succeeded_items"], final["pending_items"], final["running_items"]) == (
        "succeeded",
        ITEMS,
        0,
        0,
    )
    assert item_messages <= events.ITEMS_PER_FLUSH * len(updates)
    last_overview = (await receive_until(everything, lambda m: m["batch"]["status"] == "succeeded"))[-1]
    assert last_overview["batch"]["succeeded_items"] == ITEMS


def test_many_changes_between_flushes_collapse_into_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = events.Publisher()
    monkeypatch.setattr(publisher, "_has_listeners", lambda: True)
    monkeypatch.setattr(publisher, "_thread", type("Alive", (), {"is_alive": lambda self: True})())
    batch_id = uuid.uuid4()
    for item_id in range(1_000):
        publisher.mark(batch_id, [item_id])
    assert list(publisher._dirty) == [batch_id]
    remembered = list(publisher._dirty[batch_id])
    assert remembered == list(range(1_000 - events.MAX_DIRTY_ITEMS, 1_000))


def test_a_broken_channel_layer_never_reaches_the_services(
    monkeypatch: pytest.MonkeyPatch, submit: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("layer down")

    monkeypatch.setattr(events.publisher, "mark", explode)
    batch = submit("demo.noop", [{}] * 2)
    result = services.request_cancel(batch_id=batch.pk)
    assert result.batch is not None
    assert result.batch.status == BatchStatus.CANCELLED
    assert "could not record a batch event" in caplog.text


def test_a_failing_flush_is_logged_and_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = events.Publisher()
    monkeypatch.setattr(publisher, "_messages", lambda dirty: (_ for _ in ()).throw(RuntimeError("db gone")))
    publisher._dirty[uuid.uuid4()] = events.OrderedDict()
    loop = asyncio.new_event_loop()
    try:
        publisher.flush(loop)
    finally:
        loop.close()
    assert publisher._dirty == {}
    assert "publishing batch events failed" in caplog.text


def test_batch_update_to_the_batch_group_carries_durations_of_the_items_that_finished(
    submit: Callable[..., Any],
) -> None:
    from collections import OrderedDict
    from datetime import timedelta

    from django.utils import timezone

    from batch.models import BatchJob, BatchJobItem, ItemStatus

    batch = submit("demo.noop", [{}] * 4)
    items = list(BatchJobItem.objects.filter(batch=batch).order_by("index"))
    start = timezone.now() - timedelta(seconds=10)
    outcomes = [(ItemStatus.SUCCEEDED, 1.5), (ItemStatus.FAILED, 0.25), (ItemStatus.RUNNING, None)]
    for item, (status, seconds) in zip(items, outcomes, strict=False):
        finished = start + timedelta(seconds=seconds) if seconds is not None else None
        BatchJobItem.objects.filter(pk=item.pk).update(status=status, started_at=start, finished_at=finished)
    counters = {"running_items": 1, "succeeded_items": 1, "failed_items": 1}
    BatchJob.objects.filter(pk=batch.pk).update(status=BatchStatus.RUNNING, **counters)  # the invariant holds

    dirty = {batch.pk: OrderedDict.fromkeys(item.pk for item in items)}
    messages = events.Publisher()._messages(dirty)
    updates = {group: message["batch"] for group, message in messages if message["type"] == "batch.updated"}
    durations = sorted(updates[events.batch_group(batch.pk)]["recent_durations"])
    assert durations == [[items[0].pk, 1.5], [items[1].pk, 0.25]]  # running and pending items: none
    assert "recent_durations" not in updates[events.BATCHES_GROUP]  # the overview needs no durations
