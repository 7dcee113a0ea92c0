"""Prometheus metrics: who may read /metrics, what the engine counts, and a worker's own server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from batch import metrics, services
from batch.handlers import ItemContext, batch_handler
from batch.models import BatchJob, BatchStatus
from batch.worker import Worker, WorkerConfig
from tests.conftest import ROOT, worker_log
from tests.servers import free_port

TOKEN = "metrics-token-for-the-tests-0123456789"
TIMEOUT = 30

StartWorker = Callable[..., subprocess.Popen[str]]


@batch_handler("test.metrics_probe")
async def metrics_probe(params: dict[str, Any], ctx: ItemContext) -> None:
    """Only this module uses this handler, so its series in the exposition are this module's."""
    if params.get("fail"):
        raise ValueError("asked to fail")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


# --- who may read /metrics -----------------------------------------------------------------


def assert_problem(response: Any, status: int) -> None:
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "instance"} <= set(body)
    assert "batch_items_finished" not in response.content.decode()


@pytest.mark.django_db
def test_metrics_refuse_an_anonymous_request(client: Any) -> None:
    response = client.get("/metrics")
    assert_problem(response, 401)
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
def test_metrics_refuse_a_user_who_is_not_staff(client: Any, make_user: Callable[..., Any]) -> None:
    client.force_login(make_user("alice"))
    assert_problem(client.get("/metrics"), 403)


@pytest.mark.django_db
def test_metrics_refuse_any_bearer_token_when_none_is_configured(client: Any, settings: Any) -> None:
    settings.BATCH_METRICS_TOKEN = ""
    assert_problem(client.get("/metrics", HTTP_AUTHORIZATION="Bearer "), 401)
    assert_problem(client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything"), 401)


@pytest.mark.django_db
def test_metrics_refuse_a_wrong_bearer_token(client: Any, settings: Any) -> None:
    settings.BATCH_METRICS_TOKEN = TOKEN
    assert_problem(client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}x"), 401)
    assert_problem(client.get("/metrics", HTTP_AUTHORIZATION="Token " + TOKEN), 401)


@pytest.mark.django_db
def test_metrics_serve_a_staff_session(client: Any, make_user: Callable[..., Any]) -> None:
    client.force_login(make_user("admin", is_staff=True))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE batch_items_finished_total counter" in response.content.decode()


@pytest.mark.django_db
def test_metrics_serve_the_right_bearer_token_with_the_database_gauges(
    client: Any, settings: Any, submit: Callable[..., BatchJob]
) -> None:
    settings.BATCH_METRICS_TOKEN = TOKEN
    submit("demo.noop", [{}] * 7)
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    text = response.content.decode()
    assert value(text, "batch_batches", status="pending") == 1
    assert value(text, "batch_batches", status="succeeded") == 0
    assert value(text, "batch_items_pending", handler="demo.noop") == 7


# --- what the engine counts ------------------------------------------------------------------


def worker_config(**overrides: Any) -> WorkerConfig:
    base = {
        "worker_id": f"test-{uuid.uuid4().hex[:8]}",
        "handle_signals": False,
        "exit_when_idle": True,
        "poll_interval": 0.05,
        "heartbeat_seconds": 0.5,
    }
    return WorkerConfig.from_settings(**{**base, **overrides})


def registry_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.django_db(transaction=True)
async def test_a_worker_run_counts_items_by_handler_and_outcome() -> None:
    steps_before = registry_value("batch_step_duration_seconds_count")
    syncs_before = registry_value("batch_permit_sync_duration_seconds_count")
    items = [{"fail": index % 3 == 0} for index in range(10)]  # 4 fail, 6 succeed
    batch = await sync_to_async(lambda: services.submit_batch(handler="test.metrics_probe", items=items).batch)()
    await asyncio.wait_for(Worker(worker_config()).run(), TIMEOUT)
    assert (await BatchJob.objects.aget(pk=batch.pk)).status == BatchStatus.FAILED

    text = (await sync_to_async(lambda: metrics_text())()).decode()
    probe = {"handler": "test.metrics_probe"}
    assert value(text, "batch_items_finished_total", **probe, outcome="succeeded") == 6
    assert value(text, "batch_items_finished_total", **probe, outcome="failed") == 4
    assert value(text, "batch_items_finished_total", **probe, outcome="cancelled") == 0
    assert value(text, "batch_item_duration_seconds_count", **probe) == 10
    assert value(text, "batch_item_duration_seconds_bucket", **probe, le="+Inf") == 10
    assert value(text, "batch_items_running", **probe) is None  # the worker has stopped
    assert registry_value("batch_step_duration_seconds_count") > steps_before
    assert registry_value("batch_permit_sync_duration_seconds_count") > syncs_before


def metrics_text() -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY)


@pytest.mark.django_db(transaction=True)
async def test_metrics_off_leave_the_counters_alone(settings: Any) -> None:
    settings.BATCH_METRICS_ENABLED = False
    before = registry_value("batch_items_finished_total", handler="demo.noop", outcome="succeeded")
    await sync_to_async(lambda: services.submit_batch(handler="demo.noop", items=[{}] * 5))()
    await asyncio.wait_for(Worker(worker_config()).run(), TIMEOUT)
    assert registry_value("batch_items_finished_total", handler="demo.noop", outcome="succeeded") == before


@pytest.mark.django_db(transaction=True)
def test_a_cancel_records_how_long_it_waited_for_the_drain(
    api_client: Any, user: Any, submit: Callable[..., BatchJob]
) -> None:
    before = registry_value("batch_cancel_drain_seconds_count", result="drained")
    batch = submit("demo.noop", [{}] * 3, created_by=user)  # nothing runs: its pending items are cancelled at once
    assert api_client.delete(f"/api/batches/{batch.pk}/").status_code == 200
    assert registry_value("batch_cancel_drain_seconds_count", result="drained") == before + 1


@pytest.mark.parametrize(
    ("exc", "reason"),
    [(asyncio.CancelledError(), "cancelled"), (TimeoutError(), "timeout"), (RuntimeError(), "error")],
)
def test_a_killed_sync_process_is_counted_by_reason(exc: BaseException, reason: str) -> None:
    before = registry_value("batch_sync_processes_killed_total", reason=reason)
    metrics.count_kill(exc)
    assert registry_value("batch_sync_processes_killed_total", reason=reason) == before + 1


# --- a worker's own server -------------------------------------------------------------------


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_runbatch_serves_its_metrics_on_the_metrics_port(start_worker: StartWorker) -> None:
    items = [{"seconds": 0.02}] * 400  # 400 x 20 ms at parallel 4: about 2 s
    batch = services.submit_batch(handler="demo.sleep", items=items, max_parallel=4).batch
    port = free_port()
    worker = start_worker("--batch", str(batch.id), "--metrics-port", str(port))
    mid_run: float | None = None
    deadline = time.monotonic() + TIMEOUT
    while mid_run is None and worker.poll() is None and time.monotonic() < deadline:
        text = scrape(port) or ""
        finished = value(text, "batch_items_finished_total", handler="demo.sleep", outcome="succeeded")
        if finished and 0 < finished < 400:
            mid_run = finished
            running = value(text, "batch_items_running", handler="demo.sleep")
            assert running is not None and 0 <= running <= 4
            assert "batch_batches" not in text  # cluster gauges come from the web process only
        time.sleep(0.05)
    assert mid_run is not None, worker_log(worker)
    assert worker.wait(timeout=TIMEOUT) == 0, worker_log(worker)
    assert scrape(port) is None, "the metrics server ends with the worker"
    batch.refresh_from_db()
    assert batch.succeeded_items == 400


def test_the_grafana_dashboard_reads_only_metrics_the_app_defines() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bbatch_[a-z_]+", expr)}
    defined = {sample.name for family in REGISTRY.collect() for sample in family.samples}
    defined |= {f"{family.name}{suffix}" for family in REGISTRY.collect() for suffix in ("", "_total", "_bucket")}
    defined |= {"batch_batches", "batch_items_pending"}  # the web process's database gauges
    assert used and used <= defined, used - defined
    assert any(expr.startswith("histogram_quantile(0.95, ") for expr in exprs)
