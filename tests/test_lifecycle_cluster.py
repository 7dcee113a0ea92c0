"""The lifecycle end to end: the REST API against real `runbatch` processes on the test database.

Pause stops new starts on every worker of a cluster and resume continues; a failure threshold
of 1 stops within one item; a deadline fires within a poll of its time (by the database's clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.models import BatchJob, BatchJobItem, ItemStatus
from tests.cluster_support import SPREAD, Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("no_throttle")]

POLL = 0.1  # the workers' poll interval (tests/conftest.py's worker_env)


@pytest.fixture
def cluster(start_worker: Callable[..., Any], tmp_path: Path) -> Iterator[Cluster]:
    group = Cluster(start_worker=start_worker, events_file=tmp_path / "events.log", env=SPREAD)
    yield group
    group.stop_all()


def starts(cluster: Cluster, batch: BatchJob) -> list[Any]:
    return [e for e in cluster.events() if e.kind == "start" and e.batch_id == str(batch.pk)]


def submitted(api_client: Any, handler: str, items: list[dict[str, Any]], **fields: Any) -> BatchJob:
    response = api_client.post("/api/batches/", {"handler": handler, "items": items, **fields}, format="json")
    assert response.status_code == 201, response.content
    return BatchJob.objects.get(pk=response.json()["id"])


def test_pause_stops_new_starts_on_every_worker_and_resume_runs_the_rest(cluster: Cluster, api_client: Any) -> None:
    batch = submitted(api_client, "cluster.sleep", [{"seconds": 0.15}] * 60, max_parallel=4)
    cluster.start_many(2)
    wait_until(lambda: {e.worker for e in starts(cluster, batch)} == {"w1", "w2"}, timeout=30, what="both workers")

    response = api_client.post(f"/api/batches/{batch.pk}/pause/?drain_timeout=20")
    answered = time.time()
    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["running_items"]) == ("paused", 0)
    started_before = len(starts(cluster, batch))
    assert 2 <= started_before < 60
    # A negative needs a window: ten poll intervals of both workers, and nothing may start.
    time.sleep(10 * POLL)
    late = [e for e in starts(cluster, batch) if e.at > answered]
    assert late == [], f"items started after the pause answered: {late}"
    assert BatchJobItem.objects.filter(batch=batch, status=ItemStatus.RUNNING).count() == 0
    assert BatchJob.objects.get(pk=batch.pk).status == "paused"

    resumed = api_client.post(f"/api/batches/{batch.pk}/resume/")
    assert (resumed.status_code, resumed.json()["status"]) == (200, "running")
    done = cluster.wait_batch(batch, ("succeeded", "failed"), timeout=60)
    assert (done.status, done.succeeded_items) == ("succeeded", 60), cluster.logs()
    runs = starts(cluster, batch)
    assert sorted(e.index for e in runs) == list(range(60)), "every item ran once"
    after = [(e.worker, round(e.at - answered, 2)) for e in runs if e.at > answered]
    assert {w for w, _ in after} == {"w1", "w2"}, f"both workers took the rest up: {after}\n{cluster.logs()}"


def test_a_failure_threshold_of_one_stops_within_one_item(
    cluster: Cluster, api_client: Any, record_property: Callable[[str, object], None]
) -> None:
    items = [{"seconds": 0.05, "fail_attempts": 1 if i == 3 else 0, "error": "value"} for i in range(40)]
    batch = submitted(api_client, "cluster.flaky", items, max_parallel=1, max_failures=1)
    cluster.start("w1")
    done = cluster.wait_batch(batch, ("failed", "cancelled", "succeeded"), timeout=60)
    assert (done.status, done.status_reason, done.failed_items) == ("failed", "failure threshold", 1)
    events = [e for e in cluster.events() if e.batch_id == str(batch.pk)]
    failed_at = next(e.at for e in events if e.kind == "end" and e.index == 3)
    after = sorted(e.index for e in events if e.kind == "start" and e.at > failed_at)
    record_property("starts_after_the_failure", len(after))
    assert len(after) <= 1, f"items started after the failure: {after}"
    # The one that may start meanwhile sees the cancel (it sleeps cooperatively) or finishes.
    assert done.succeeded_items in (3, 3 + len(after))
    assert done.succeeded_items + done.cancelled_items == 39


def test_a_deadline_fires_within_a_poll_of_its_time(
    cluster: Cluster, api_client: Any, record_property: Callable[[str, object], None]
) -> None:
    items = [{"seconds": 30}] * 6
    batch = submitted(api_client, "cluster.sleep", items, max_parallel=2, deadline_seconds=1)
    cluster.start("w1")
    done = cluster.wait_batch(batch, ("cancelled",), timeout=30)
    assert done.status_reason == "deadline" and done.started_at and done.cancel_requested_at
    late = (done.cancel_requested_at - done.started_at).total_seconds() - 1
    record_property("deadline_fired_late_s", round(late, 3))
    # Both times are the database's; a worker checks the deadline every poll (0.1 s here).
    assert 0 <= late < 1.0, f"the deadline fired {late:.3f} s after its time"
    assert done.cancelled_items == 6 and done.succeeded_items == 0
