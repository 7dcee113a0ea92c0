"""Security round 2 (issue 15), item 2: a waiting cancel holds no database connection, waits per
user are bounded (429), and `?drain_timeout=` is honoured (a 504 in about that time)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.core.cache import cache
from rest_framework.authtoken.models import Token

from batch import services
from batch.models import BatchJob, BatchStatus
from batch.notify import control_watcher
from tests.problems import assert_problem

pytestmark = pytest.mark.usefixtures("no_throttle")


@pytest.fixture(autouse=True)
def _stop_watcher() -> Any:
    yield
    control_watcher.stop()  # its LISTEN connection would block dropping the test database
    cache.clear()


def running_batch(owner: Any) -> BatchJob:
    """A batch with one item running on a worker that never reports: a cancel of it waits."""
    batch = services.submit_batch(handler="demo.sleep", items=[{"seconds": 60}], created_by=owner).batch
    started = services.claim_items(batch_id=batch.pk, worker_id="w-gone", limit=1, lease_seconds=300)
    assert len(started) == 1
    return batch


def stop_items(batch: BatchJob) -> None:
    """What the worker reports once its cancelled item has stopped: the batch → cancelled."""
    items = list(batch.items.filter(status="running").values_list("id", flat=True))
    outcomes = [services.Outcome(item_id=item_id, status="cancelled") for item_id in items]
    services.complete_items(batch_id=batch.pk, worker_id="w-gone", outcomes=outcomes)


@pytest.mark.django_db
@pytest.mark.parametrize("seconds", [0.5, 2.0])
def test_short_drain_timeout_answers_504_in_about_that_time(api_client: Any, user: Any, seconds: float) -> None:
    batch = running_batch(user)
    started = time.monotonic()
    response = api_client.delete(f"/api/batches/{batch.pk}/?drain_timeout={seconds}")
    elapsed = time.monotonic() - started
    body = assert_problem(response, 504)
    assert body["batch"]["status"] == "cancelling"
    assert seconds * 0.9 <= elapsed < seconds + 3  # the default (30 s) would take far longer


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_waiting_cancels_hold_no_connection_and_are_bounded_per_user(serve: Any, make_user: Any) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice_key, bob_key = (Token.objects.create(user=u).key for u in (alice, bob))
    bob_batch = services.submit_batch(handler="demo.noop", items=[{}], created_by=bob).batch
    waiting = [running_batch(alice) for _ in range(3)]
    extra = running_batch(alice)
    # A pool of 2 connections and 3 waits: a wait that held its connection starves every other request.
    server = serve(DATABASE_POOL_MAX_SIZE="2", BATCH_MAX_WAITING_CANCELS_PER_USER="3", BATCH_CANCEL_THROTTLE_RATE="")
    answers: dict[str, tuple[int, Any]] = {}

    def cancel(batch: BatchJob) -> None:
        status, _, body = server.request("DELETE", f"/api/batches/{batch.pk}/?drain_timeout=60", token=alice_key)
        answers[str(batch.pk)] = (status, body)

    threads = [threading.Thread(target=cancel, args=(batch,)) for batch in waiting]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while BatchJob.objects.filter(pk__in=[b.pk for b in waiting], status=BatchStatus.CANCELLING).count() < 3:
        assert time.monotonic() < deadline, "the three cancels did not start"
        time.sleep(0.05)
    try:
        started = time.monotonic()
        status, _, listing = server.request("GET", "/api/batches/", token=bob_key, timeout=30)
        assert (status, [b["id"] for b in listing["results"]]) == (200, [str(bob_batch.pk)])
        assert time.monotonic() - started < 3  # 27.6 s before: the pool was held by the waits
        status, headers, problem = server.request(
            "DELETE", f"/api/batches/{extra.pk}/?drain_timeout=60", token=alice_key
        )
        assert (status, problem["status"], headers.get("Retry-After")) == (429, 429, "60")
        assert BatchJob.objects.get(pk=extra.pk).status == BatchStatus.RUNNING  # refused before anything changed
        status, _, _ = server.request("GET", f"/api/batches/{bob_batch.pk}/", token=bob_key, timeout=30)
        assert status == 200
    finally:
        for batch in waiting:
            stop_items(batch)
        for thread in threads:
            thread.join(timeout=30)
    assert {status for status, _ in answers.values()} == {200}
    assert {body["status"] for _, body in answers.values()} == {"cancelled"}
