"""Prometheus metrics: the metric objects, the small hooks the engine calls, the scrape-time collectors.

Process metrics (items, steps, permit syncs, recoveries, kills, cancel drains) live in
prometheus_client's default registry: a worker serves them on `runbatch --metrics-port`, the web
process on `/metrics` (`batch.metrics_view`). Cluster-wide gauges read from the database at
scrape time (`batch_batches`, `batch_items_pending`) are served by the web process only, so N
workers do not report N copies of the same numbers. `BATCH_METRICS_ENABLED = False` turns the
hooks into no-ops (for an A/B of their cost); the objects stay defined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import Count, F, Sum
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from batch.models import BatchJob, BatchStatus, ItemStatus

if TYPE_CHECKING:
    from batch.worker import Worker

logger = logging.getLogger(__name__)

# No `*_created` series: they double every counter's and histogram's series and no panel reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

ITEM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DRAIN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RETRIED = "retried"  # a failed attempt that will be tried again (the item is pending once more)
OUTCOMES = (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED, RETRIED)
PENDING_STATUSES = ("pending", "running", "paused")  # batches whose pending items may still start

ITEMS_FINISHED = Counter(
    "batch_items_finished",
    "Attempts this worker finished, by handler and outcome (retried: tried again later).",
    ["handler", "outcome"],
)
ITEM_SECONDS = Histogram(
    "batch_item_duration_seconds", "Time from a handler's start to its outcome.", ["handler"], buckets=ITEM_BUCKETS
)
STEP_SECONDS = Histogram(
    "batch_step_duration_seconds", "One step (group commit write) transaction of a worker.", buckets=DB_BUCKETS
)
PERMIT_SYNC_SECONDS = Histogram(
    "batch_permit_sync_duration_seconds", "One permit sync round trip of a worker.", buckets=DB_BUCKETS
)
CANCEL_DRAIN_SECONDS = Histogram(
    "batch_cancel_drain_seconds",
    "How long a cancel request waited for the batch to drain, by result (drained, timeout, gone).",
    ["result"],
    buckets=DRAIN_BUCKETS,
)
LEASE_RECOVERIES = Counter("batch_lease_recoveries", "Items taken back from workers whose leases expired.")
SYNC_KILLS = Counter(
    "batch_sync_processes_killed", "Sync handler processes killed, by reason (timeout, cancelled, error).", ["reason"]
)
WEBHOOK_DELIVERIES = Counter(
    "batch_webhook_deliveries",
    "Completion webhook attempts, by outcome (delivered, retry: failed and retried later, failed: given up).",
    ["outcome"],
)


def enabled() -> bool:
    return bool(getattr(settings, "BATCH_METRICS_ENABLED", True))


# --- hooks the engine calls ---------------------------------------------------------------


class HandlerMetrics:
    """One handler's item metrics, their labelled children resolved once (per runner)."""

    __slots__ = ("_duration", "_finished")

    def __init__(self, handler: str) -> None:
        self._finished: dict[str, Counter] = {status: ITEMS_FINISHED.labels(handler, status) for status in OUTCOMES}
        self._duration = ITEM_SECONDS.labels(handler)

    def finished(self, status: str, seconds: float | None = None) -> None:
        self._finished[status].inc()
        if seconds is not None:
            self._duration.observe(seconds)


class _NoMetrics(HandlerMetrics):
    __slots__ = ()

    def __init__(self) -> None:
        pass

    def finished(self, status: str, seconds: float | None = None) -> None:
        pass


def for_handler(handler: str) -> HandlerMetrics:
    return HandlerMetrics(handler) if enabled() else _NoMetrics()


@contextlib.contextmanager
def step_timer() -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    finally:
        if enabled():
            STEP_SECONDS.observe(time.perf_counter() - began)


def observe_permit_sync(seconds: float) -> None:
    if enabled():
        PERMIT_SYNC_SECONDS.observe(seconds)


def observe_cancel_drain(seconds: float, *, status: str | None) -> None:
    if enabled():
        result = "gone" if status is None else "timeout" if status == "cancelling" else "drained"
        CANCEL_DRAIN_SECONDS.labels(result).observe(seconds)


def count_recoveries(items: int) -> int:
    if items and enabled():
        LEASE_RECOVERIES.inc(items)
    return items


def count_webhook(outcome: str) -> None:
    """One webhook attempt was recorded: `delivered`, `retry` or `failed` (given up)."""
    if enabled():
        WEBHOOK_DELIVERIES.labels(outcome).inc()


def count_kill(exc: BaseException) -> None:
    """A sync handler's process is killed because of `exc` (its timeout, a cancel, an error)."""
    if enabled():
        cancelled = isinstance(exc, asyncio.CancelledError)
        SYNC_KILLS.labels("timeout" if isinstance(exc, TimeoutError) else "cancelled" if cancelled else "error").inc()


# --- this process's workers: items running, read at scrape time ---------------------------

_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


def track_worker(worker: Worker) -> None:
    _workers.add(worker)


def untrack_worker(worker: Worker) -> None:
    _workers.discard(worker)


class RunningCollector(Collector):
    """`batch_items_running{handler}`: the items this process's workers run now (no hot-path cost)."""

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        running: dict[str, int] = {}
        for worker in list(_workers):
            for runner in list(worker.runners.values()):  # the loop's dict, copied in one C call
                name = runner.handler.name
                running[name] = running.get(name, 0) + len(runner.running_item_ids)
        family = self._family()
        for handler, count in sorted(running.items()):
            family.add_metric([handler], count)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("batch_items_running", "Items running on this worker, by handler.", labels=["handler"])


REGISTRY.register(RunningCollector())


# --- the cluster, from the database at scrape time (web process) --------------------------


class DatabaseCollector(Collector):
    """`batch_batches{status}` and `batch_items_pending{handler}`: two GROUP BY queries on
    batch_job (status index; pending derived from the counters, no item rows read)."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        by_status = dict.fromkeys(BatchStatus.values, 0)
        for status, count in BatchJob.objects.order_by().values_list("status").annotate(n=Count("*")):
            by_status[status] = count
        pending = (
            F("total_items") - F("running_items") - F("succeeded_items") - F("failed_items") - F("cancelled_items")
        )
        rows = BatchJob.objects.filter(status__in=PENDING_STATUSES).order_by().values_list("handler")
        batches = GaugeMetricFamily("batch_batches", "Batches by status.", labels=["status"])
        for status, count in sorted(by_status.items()):
            batches.add_metric([status], count)
        items = GaugeMetricFamily(
            "batch_items_pending", "Pending items of live batches, by handler.", labels=["handler"]
        )
        for handler, count in sorted(rows.annotate(n=Sum(pending))):
            items.add_metric([handler], count or 0)
        return [batches, items]


DATABASE_REGISTRY = CollectorRegistry()
DATABASE_REGISTRY.register(DatabaseCollector())


# --- a worker's own HTTP server -----------------------------------------------------------


class ServeError(Exception):
    """The metrics server cannot listen (the port is taken, the address is not this host's)."""


@contextlib.contextmanager
def serving(port: int, *, addr: str = "0.0.0.0") -> Iterator[Any]:
    """Serve this process's metrics on `addr:port` from a daemon thread (not the event loop)
    while the block runs; the server is shut down and its socket closed after. Port 0: off."""
    if not port:
        yield None
        return
    try:
        server, thread = start_http_server(port, addr=addr)
    except OSError as exc:
        raise ServeError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
    logger.info("serving metrics", extra={"addr": addr, "port": server.server_port})
    try:
        yield server
    finally:
        server.shutdown()  # returns once its thread's serve_forever() has ended
        server.server_close()
        thread.join(5)
