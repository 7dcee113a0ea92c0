"""Database faults during a submit: the batch is written whole or not at all.

- Both databases: the connection "drops" (OperationalError) in the middle of the chunked item
  insert; the API answers a 500 problem and no batch, item or audit row remains.
- PostgreSQL: the live server's own connection is killed (`pg_terminate_backend`) while it
  inserts a 60,000-item batch; afterwards there is no batch or one complete batch, and retries
  with one Idempotency-Key end with exactly one complete batch.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.core.cache import cache
from django.db import OperationalError, connection
from rest_framework.authtoken.models import Token

from batch.models import BatchAuditEvent, BatchJob, BatchJobItem
from batch.selectors import counter_mismatches
from batch.services import submit
from tests.reliability.conftest import WEB_APP_NAME, LiveServer


def rows() -> tuple[int, int, int]:
    return BatchJob.objects.count(), BatchJobItem.objects.count(), BatchAuditEvent.objects.count()


@pytest.mark.django_db(transaction=True)
def test_connection_lost_mid_bulk_insert_leaves_nothing(
    api_client: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.BATCH_SUBMIT_THROTTLE_RATE = ""
    cache.clear()
    monkeypatch.setattr(submit, "SUBMIT_CHUNK_SIZE", 10)
    real_write = submit._write_item_chunk  # one chunk of items: COPY on PostgreSQL, bulk_create on SQLite
    calls = []

    def flaky(batch_id: Any, start: int, chunk: list[Any]) -> None:
        calls.append(len(chunk))
        if len(calls) == 3:
            raise OperationalError("server closed the connection unexpectedly")
        real_write(batch_id, start, chunk)

    monkeypatch.setattr(submit, "_write_item_chunk", flaky)
    response = api_client.post("/api/batches/", {"handler": "demo.noop", "items": [{}] * 45}, format="json")
    assert response.status_code == 500
    assert response["Content-Type"] == "application/problem+json"
    assert "server closed" not in response.content.decode()
    assert calls == [10, 10, 10]  # two chunks were inserted before the fault
    assert rows() == (0, 0, 0)
    monkeypatch.setattr(submit, "_write_item_chunk", real_write)
    retry = api_client.post("/api/batches/", {"handler": "demo.noop", "items": [{}] * 45}, format="json")
    assert retry.status_code == 201
    assert rows() == (1, 45, 1)


def _kill_when_inserting(stop: threading.Event, killed: list[int]) -> None:
    """Terminate the web server's backend once it is inserting items (runs in its own thread)."""
    from django.db import connections

    try:
        with connections["default"].cursor() as cursor:
            while not stop.is_set() and not killed:
                cursor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active'"
                    " AND (query LIKE 'INSERT INTO \"batch_job_item\"%%' OR query LIKE 'COPY batch_job_item%%')",
                    [WEB_APP_NAME],
                )
                for (pid,) in cursor.fetchall():
                    cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
                    killed.append(pid)
                time.sleep(0.005)
    finally:
        connections["default"].close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_killed_web_connection_mid_submit_leaves_all_or_nothing(asgi_server: LiveServer, user: Any) -> None:
    api = asgi_server.api(Token.objects.create(user=user).key)
    body = {"handler": "demo.sleep", "items": [{"seconds": 0}] * 60_000, "name": "big"}
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_when_inserting, args=(stop, killed), daemon=True)
    killer.start()
    try:
        status, problem, content_type = api.request("POST", "/api/batches/", body, timeout=120)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "the insert finished before it could be interrupted"
    assert status == 500 and content_type == "application/problem+json", (status, problem)
    assert "terminat" not in str(problem)
    batches = list(BatchJob.objects.all())
    assert batches == [] or (len(batches) == 1 and batches[0].total_items == 60_000)
    assert BatchJobItem.objects.count() in (0, 60_000)
    # The server recovers: retried with an Idempotency-Key, the batch exists once, complete.
    key = {"Idempotency-Key": "retry-after-kill"}
    answers = [
        api.request("POST", "/api/batches/", body | {"name": "retry"}, timeout=120, headers=key) for _ in range(3)
    ]
    codes = [code for code, _, _ in answers]
    assert codes[-2:] == [201, 200] or codes[-1] == 200, codes  # at most one failure on a dead pooled connection
    retry = BatchJob.objects.get(name="retry")
    print(f"\nkilled {killed}; batches after the kill: {len(batches)}; retry answers {codes}")
    assert {answer["id"] for code, answer, _ in answers if code < 300} == {str(retry.pk)}
    assert BatchJobItem.objects.filter(batch=retry).count() == 60_000 and not counter_mismatches(retry)
    connection.close()
