"""Several real `runbatch` processes sharing PostgreSQL: cluster-wide caps, cancel, fairness,
worker identity. Item start/end times come from the instrumented `cluster.sleep` handler."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batch import services
from batch.models import BatchJobItem, BatchStatus, ItemStatus
from tests.cluster_handlers import Event, peak_concurrency  # importing registers cluster.sleep
from tests.cluster_support import SPREAD, Cluster, submit, wait_until
from tests.conftest import worker_log

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def cluster(start_worker: Any, tmp_path: Path) -> Cluster:
    return Cluster(start_worker=start_worker, events_file=tmp_path / "events.log")


def test_three_workers_hold_the_cluster_wide_cap_exactly(cluster: Cluster, record_property: Any) -> None:
    # Two slots per worker: reaching 4 takes two workers at once, and a cap held only
    # in-process would let three workers reach 6.
    cluster.start_many(3, BATCH_WORKER_CONCURRENCY="2", BATCH_LOG_SUMMARY_SECONDS="0.5")
    batch = submit(300, 0.02, max_parallel=4)

    cluster.wait_batch(batch, (BatchStatus.SUCCEEDED, BatchStatus.FAILED), timeout=25)

    events = cluster.events()
    starts = Counter(e.index for e in events if e.kind == "start")
    record_property("cluster_peak", peak_concurrency(events))
    assert batch.status == BatchStatus.SUCCEEDED, cluster.logs()
    assert peak_concurrency(events) == 4
    assert sorted(starts) == list(range(300)) and set(starts.values()) == {1}, "every item runs exactly once"
    assert len({e.worker for e in events}) >= 2, "the items ran on several workers"
    assert set(BatchJobItem.objects.filter(batch=batch).values_list("attempts", flat=True)) == {1}
    assert batch.succeeded_items == 300 and batch.running_items == 0
    logs = cluster.logs()
    assert f"batch started batch_id={batch.id}" in logs
    assert f"batch finished batch_id={batch.id} status=succeeded total=300" in logs
    assert f"worker summary worker_id={cluster.worker_id('w1')} batches=" in logs


def test_cancel_reaches_every_worker_and_nothing_starts_after_it(cluster: Cluster, record_property: Any) -> None:
    cluster.start_many(3, BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS="5", **SPREAD)
    batch = submit(200, 0.3, max_parallel=6)  # 3 workers x 2 slots: every worker runs items
    wait_until(lambda: len({e.worker for e in cluster.events()}) == 3, timeout=15, what="items on all workers")

    services.request_cancel(batch_id=batch.id)
    cluster.wait_batch(batch, (BatchStatus.CANCELLED,), timeout=5)

    assert batch.cancel_requested_at is not None
    drained = (batch.finished_at - batch.cancel_requested_at).total_seconds()  # type: ignore[operator]
    record_property("cancel_drain_seconds", round(drained, 3))
    assert drained < 5, f"drained in {drained:.2f}s, past the 5 s drain timeout"
    started = BatchJobItem.objects.filter(batch=batch, started_at__isnull=False)
    assert not started.filter(started_at__gt=batch.cancel_requested_at).exists(), "an item was claimed after cancel"
    events_at_cancel = cluster.events()
    cutoff = batch.cancel_requested_at.timestamp() + 0.5  # the claim committed before the cancel, its task a bit later
    assert all(e.at <= cutoff for e in events_at_cancel if e.kind == "start")
    assert _all_ended(events_at_cancel), "every started handler had returned when the batch was cancelled"
    assert set(cluster.stop_all().values()) == {0}
    assert len(cluster.events()) == len(events_at_cancel), "nothing ran after the batch was cancelled"
    assert batch.cancelled_items == 200 - batch.succeeded_items


def _all_ended(events: list[Event]) -> bool:
    return Counter(e.kind for e in events)["start"] == Counter(e.kind for e in events)["end"]


def test_small_batch_is_not_starved_by_a_large_one(cluster: Cluster, record_property: Any) -> None:
    """Bound: the small batch's first item starts within one item of the large batch (0.3 s)
    plus 1 s of submission and notification latency, with a poll interval (2 s) that is
    longer than the bound, so only LISTEN/NOTIFY can meet it."""
    cluster.start_many(3, BATCH_WORKER_CONCURRENCY="2", BATCH_POLL_INTERVAL_SECONDS="2")
    large = submit(5_000, 0.3, max_parallel=4)
    wait_until(lambda: peak_concurrency(cluster.events()) >= 4, timeout=15, what="the large batch to fill its cap")

    submitted = time.time()
    small = submit(10, 0.0, max_parallel=4)
    first = wait_until(
        lambda: next((e for e in cluster.events() if e.batch_id == str(small.id) and e.kind == "start"), None),
        timeout=10,
        what="the small batch to start",
    )
    cluster.wait_batch(small, (BatchStatus.SUCCEEDED,), timeout=10)
    services.request_cancel(batch_id=large.id)
    cluster.wait_batch(large, (BatchStatus.CANCELLED,), timeout=10)

    waited = first.at - submitted
    record_property("small_batch_wait_seconds", round(waited, 3))
    assert waited < 1.3, f"the small batch waited {waited:.2f}s behind the large one"
    assert large.succeeded_items < 5_000


def test_second_worker_with_the_same_id_is_refused(cluster: Cluster) -> None:
    cluster.start_many(1)
    duplicate = cluster.start_worker("--worker-id", cluster.worker_id("w1"), env={"BATCH_LEASE_SECONDS": "30"})

    assert duplicate.wait(timeout=30) != 0
    assert f"worker id '{cluster.worker_id('w1')}' is in use" in worker_log(duplicate)
    assert cluster.workers["w1"].poll() is None, "the first worker keeps running"
    batch = submit(3, 0.0, max_parallel=2)
    cluster.wait_batch(batch, (BatchStatus.SUCCEEDED,), timeout=10)
    assert BatchJobItem.objects.filter(batch=batch, status=ItemStatus.SUCCEEDED).count() == 3
