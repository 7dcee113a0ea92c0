"""Soak: 20 batches of mixed handlers submitted at once through the live API by four clients while
two real `runbatch` workers run them; some cancelled mid-way, some resized. Afterwards nothing is
lost: every batch terminal, counters equal to their items, no item running, every success has its result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from batch.models import BatchJob, BatchJobItem, ItemStatus
from batch.selectors import counter_mismatches
from tests.reliability.conftest import Api, LiveServer

logger = logging.getLogger(__name__)

CLIENTS = 4
BATCHES_PER_CLIENT = 5
TERMINAL = {"succeeded", "failed", "cancelled"}
DEADLINE_SECONDS = 150


def _spec(kind: str, n: int) -> dict[str, Any]:
    """The submit body of one batch of `kind`."""
    items: list[dict[str, Any]]
    if kind == "noop":
        return {"handler": "demo.noop", "items": [{}] * 200, "name": f"soak-{n}-noop"}
    if kind == "forecast":
        items = [{"store": f"s{i}", "product": f"p{n}", "horizon": 7} for i in range(12)]
        return {"handler": "demo.forecast", "items": items, "name": f"soak-{n}-forecast"}
    if kind == "fail":
        items = [{"seconds": 0.01, "fail": i == 3} for i in range(20)]
        return {"handler": "demo.sleep", "items": items, "name": f"soak-{n}-fail"}
    seconds, count, parallel = {"sleep": (0.02, 60, 4), "cancel": (0.3, 40, 2), "resize": (0.05, 40, 1)}[kind]
    items = [{"seconds": seconds}] * count
    return {"handler": "demo.sleep", "items": items, "max_parallel": parallel, "name": f"soak-{n}-{kind}"}


KINDS = ["noop", "sleep", "cancel", "forecast", "resize", "fail"]
EXPECTED = {
    "noop": "succeeded",
    "sleep": "succeeded",
    "forecast": "succeeded",
    "resize": "succeeded",
    "fail": "failed",
    "cancel": "cancelled",
}


def _wait(api: Api, batch_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        status, body, _ = api.request("GET", f"/api/batches/{batch_id}/")
        assert status == 200, body
        if done(body):
            return dict(body)
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not done in {DEADLINE_SECONDS}s: {body}")


def _client(api: Api, number: int, start: threading.Barrier, out: dict[str, str]) -> None:
    """One client: submit its batches at once, cancel/resize some, then follow them to the end."""
    start.wait(timeout=30)
    mine: list[tuple[str, str]] = []
    for k in range(BATCHES_PER_CLIENT):
        n = number * BATCHES_PER_CLIENT + k
        kind = KINDS[n % len(KINDS)]
        status, body, _ = api.request("POST", "/api/batches/", _spec(kind, n))
        assert status == 201, body
        mine.append((body["id"], kind))
    for batch_id, kind in mine:
        if kind == "cancel":
            _wait(api, batch_id, lambda b: b["running_items"] > 0 or b["status"] in TERMINAL)
            status, body, _ = api.request("DELETE", f"/api/batches/{batch_id}/?drain_timeout=60", timeout=90)
            assert (status, body["status"]) == (200, "cancelled"), body
        elif kind == "resize":
            _wait(api, batch_id, lambda b: b["running_items"] > 0 or b["status"] in TERMINAL)
            status, body, _ = api.request("PATCH", f"/api/batches/{batch_id}/", {"max_parallel": 4})
            assert status == 200 or (status == 409 and body["status"] == 409), body
    for batch_id, kind in mine:
        out[batch_id] = _wait(api, batch_id, lambda b: b["status"] in TERMINAL)["status"]
        if out[batch_id] != EXPECTED[kind]:
            failed = api.request("GET", f"/api/batches/{batch_id}/items/?status=cancelled")[1]
            raise AssertionError(f"{kind} batch {batch_id} ended {out[batch_id]}: {failed}")


def _run_clients(server: LiveServer, tokens: list[str], counter: list[int]) -> dict[str, str]:
    start = threading.Barrier(len(tokens))
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(number: int, token: str) -> None:
        try:
            _client(server.api(token, counter), number, start, results)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_SECONDS * 2)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    return results


def _assert_nothing_lost(expected_batches: int) -> None:
    batches = list(BatchJob.objects.all())
    assert len(batches) == expected_batches
    for batch in batches:
        assert batch.status in TERMINAL, batch
        assert not counter_mismatches(batch), (batch.pk, counter_mismatches(batch))
    assert not BatchJobItem.objects.filter(status=ItemStatus.RUNNING).exists()
    assert not BatchJobItem.objects.filter(status=ItemStatus.PENDING).exists()
    succeeded = BatchJobItem.objects.filter(status=ItemStatus.SUCCEEDED).exclude(batch__handler="demo.noop")
    assert succeeded.exists()
    assert not succeeded.filter(result__isnull=True).exists()  # demo.noop returns None by design
    assert BatchJob.objects.filter(audit_events__action="submitted").count() == expected_batches


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_soak_mixed_batches_through_the_api_with_two_workers(
    asgi_server: LiveServer, start_worker: Any, make_user: Any
) -> None:
    workers = [start_worker(env={"BATCH_GLOBAL_MAX_PARALLEL": "8"}) for _ in range(2)]
    users = [make_user(f"client{i}") for i in range(CLIENTS)]
    tokens = [Token.objects.create(user=u).key for u in users]
    counter = [0]
    started = time.monotonic()
    results = _run_clients(asgi_server, tokens, counter)
    # Isolation under load: a client asking for another's batch gets 404.
    other = asgi_server.api(tokens[0], counter)
    foreign = BatchJob.objects.filter(created_by=users[1]).first()
    assert foreign is not None and other.request("GET", f"/api/batches/{foreign.pk}/")[0] == 404
    assert all(w.poll() is None for w in workers), "a worker died"
    _assert_nothing_lost(CLIENTS * BATCHES_PER_CLIENT)
    logger.warning(
        "soak: %s requests, %s batches, %.1fs, statuses %s",
        counter[0],
        len(results),
        time.monotonic() - started,
        {s: list(results.values()).count(s) for s in TERMINAL},
    )
    print(f"\nsoak: {counter[0]} requests, {len(results)} batches in {time.monotonic() - started:.1f}s")
