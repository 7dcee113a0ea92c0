"""Cancel across processes (a real `runbatch`), and concurrent idempotent submits."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection

from batch.models import BatchJob, BatchStatus
from batch.notify import control_watcher
from tests.conftest import worker_log

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    cache.clear()
    yield
    control_watcher.stop()  # its LISTEN connection would block dropping the test database


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str, proc: Any = None) -> None:
    """Poll with a deadline (the worker is another process: there is nothing to await)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            log = worker_log(proc) if proc is not None else ""
            pytest.fail(f"timed out waiting for {what}\n{log}")
        time.sleep(0.05)


def running(batch_id: Any, at_least: int) -> Callable[[], bool]:
    return lambda: BatchJob.objects.get(pk=batch_id).running_items >= at_least


def submit_sleepers(api_client: Any, n: int, **params: Any) -> str:
    items = [{"seconds": 60, **params} for _ in range(n)]
    response = api_client.post("/api/batches/", {"handler": "demo.sleep", "items": items}, format="json")
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


@pytest.mark.slow
def test_delete_waits_for_cooperative_items_to_stop_then_409_and_404(
    api_client: Any, start_worker: Callable[..., Any]
) -> None:
    batch_id = submit_sleepers(api_client, 6)
    worker = start_worker()
    wait_until(running(batch_id, 4), timeout=30, what="4 running items", proc=worker)
    started = time.monotonic()
    response = api_client.delete(f"/api/batches/{batch_id}/?drain_timeout=20")
    assert response.status_code == 200, response.content
    assert time.monotonic() - started < 10
    data = response.json()
    assert (data["status"], data["running_items"], data["cancelled_items"]) == ("cancelled", 0, 6)
    again = api_client.delete(f"/api/batches/{batch_id}/")
    assert again.status_code == 409 and again["Content-Type"] == "application/problem+json"
    assert api_client.delete(f"/api/batches/{uuid.uuid4()}/").status_code == 404


@pytest.mark.slow
def test_drain_timeout_answers_504_and_the_batch_later_ends_cancelled(
    api_client: Any, start_worker: Callable[..., Any], settings: Any
) -> None:
    settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS = 2
    batch_id = submit_sleepers(api_client, 2, cooperative=False)
    worker = start_worker(env={"BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS": "2"})
    wait_until(running(batch_id, 2), timeout=30, what="2 running items", proc=worker)
    response = api_client.delete(f"/api/batches/{batch_id}/?drain_timeout=1")
    assert response.status_code == 504, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["batch"]["status"] == "cancelling" and body["running_items"] == 2
    wait_until(
        lambda: BatchJob.objects.get(pk=batch_id).status == BatchStatus.CANCELLED,
        timeout=30,
        what="the force deadline to cancel the batch",
        proc=worker,
    )
    assert api_client.delete(f"/api/batches/{batch_id}/").status_code == 409


@pytest.mark.postgres
def test_two_concurrent_submits_with_one_key_create_one_batch(client_for: Any, user: Any) -> None:
    clients = [client_for(user) for _ in range(2)]
    barrier = threading.Barrier(2)
    answers: list[tuple[int, str]] = []
    body = {"handler": "demo.noop", "items": [{}] * 500}

    def post(client: Any) -> None:
        try:
            barrier.wait(timeout=10)
            response = client.post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="once")
            answers.append((response.status_code, response.json()["id"]))
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(code for code, _ in answers) == [200, 201]
    assert len({batch_id for _, batch_id in answers}) == 1
    assert BatchJob.objects.count() == 1


@pytest.mark.slow
@pytest.mark.postgres
def test_cancel_latency_of_eight_cooperative_items(
    api_client: Any, start_worker: Callable[..., Any], record_property: Callable[[str, object], None]
) -> None:
    """Request-to-200 of DELETE while 8 cooperative demo.sleep items run (issue 7: p50 <= 50 ms)."""
    worker = start_worker(env={"BATCH_GLOBAL_MAX_PARALLEL": "8", "BATCH_WORKER_CONCURRENCY": "8"})
    latencies = []
    for _ in range(10):
        items = [{"seconds": 60}] * 8
        body = {"handler": "demo.sleep", "items": items, "max_parallel": 8}
        batch_id = api_client.post("/api/batches/", body, format="json").json()["id"]
        wait_until(running(batch_id, 8), timeout=30, what="8 running items", proc=worker)
        started = time.perf_counter()
        response = api_client.delete(f"/api/batches/{batch_id}/?drain_timeout=10")
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["cancelled_items"] == 8
    latencies.sort()
    p50, p90 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.9)]
    record_property("cancel_latency_p50_ms", round(p50 * 1000, 1))
    print(f"cancel latency over {len(latencies)} runs: p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms")
    assert p50 < 1.0  # generous for a loaded CI machine; the report quotes the measured number
