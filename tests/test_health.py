"""`manage.py batchhealth` and `GET /health/`: workers seen, heartbeat ages, stuck leases."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from batch import services
from batch.models import BatchWorker

pytestmark = pytest.mark.django_db


def add_worker(worker_id: str, *, age: float) -> None:
    services.register_worker(worker_id=worker_id, hostname="host-a", pid=4242, concurrency=8, lease_seconds=30)
    BatchWorker.objects.filter(pk=worker_id).update(heartbeat_at=timezone.now() - timedelta(seconds=age))


def batchhealth(*args: str) -> tuple[int, dict[str, Any]]:
    out = StringIO()
    try:
        call_command("batchhealth", "--json", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(out.getvalue())


def test_no_worker_is_unhealthy() -> None:
    code, report = batchhealth()

    assert code == 1 and report["healthy"] is False
    assert report["problems"] == ["0 live worker(s), at least 1 required"]


def test_a_live_worker_is_healthy_and_reported_with_its_heartbeat_age() -> None:
    add_worker("w-live", age=1)

    code, report = batchhealth()

    assert code == 0 and report["healthy"] is True and report["alive_workers"] == 1
    [worker] = report["workers"]
    assert worker["id"] == "w-live" and worker["alive"] is True and 0.5 < worker["heartbeat_age"] < 10


def test_a_worker_past_its_lease_is_stale_and_a_probe_for_it_fails(settings: Any) -> None:
    settings.BATCH_LEASE_SECONDS = 30
    add_worker("w-live", age=1)
    add_worker("w-dead", age=120)

    code, report = batchhealth("--worker-id", "w-dead")

    assert code == 1 and report["alive_workers"] == 1
    assert {w["id"]: w["alive"] for w in report["workers"]} == {"w-live": True, "w-dead": False}
    assert report["problems"] == ["worker 'w-dead' has no heartbeat in the last 30 s"]
    assert batchhealth("--worker-id", "w-live")[0] == 0
    assert batchhealth("--min-workers", "2")[0] == 1


def test_a_lease_left_expired_is_reported_stuck(submit: Any) -> None:
    add_worker("w-live", age=0)
    batch = submit("demo.noop", [{}, {}, {}])
    services.claim_items(batch_id=batch.id, worker_id="w-gone", limit=2, lease_seconds=-600)

    code, report = batchhealth()

    assert code == 1 and report["stuck_leases"] == 2 and report["running_items"] == 2
    assert report["oldest_stuck_lease_age"] >= 600
    assert services.recover_expired_leases() == 2
    assert batchhealth()[0] == 0


def test_http_health_answers_json_without_worker_identities(client: Client) -> None:
    assert client.get("/health/").status_code == 503
    add_worker("w-secret-host-1", age=0)

    response = client.get("/health/")

    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    body = response.json()
    assert body["healthy"] is True and body["alive_workers"] == 1
    assert "w-secret-host-1" not in response.content.decode() and "host-a" not in response.content.decode()
    assert "4242" not in response.content.decode()


def test_text_output_lists_workers_and_problems() -> None:
    add_worker("w-dead", age=3600)
    out = StringIO()

    with pytest.raises(SystemExit):
        call_command("batchhealth", stdout=out)

    text = out.getvalue()
    assert text.startswith("UNHEALTHY") and "worker w-dead STALE" in text and "problem: 0 live worker(s)" in text
