"""An instrumented handler for the cluster and chaos tests (loaded by workers through
BATCH_HANDLER_MODULES=tests.cluster_handlers).

`cluster.sleep` appends one `start` line before it sleeps and one `end` line after, to the
file named by CLUSTER_EVENTS_FILE. Each line is one `os.write` to a file opened with
O_APPEND, so the file order is a real-time order of the events of every worker process.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rest_framework import serializers

from batch.handlers import ItemContext, Retry, batch_handler

EVENTS_ENV = "CLUSTER_EVENTS_FILE"
WORKER_ENV = "CLUSTER_WORKER_NAME"


class ClusterSleepParams(serializers.Serializer[Any]):
    seconds = serializers.FloatField(min_value=0, max_value=3600)
    cooperative = serializers.BooleanField(default=True)


def _record(kind: str, ctx: ItemContext) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    worker = os.environ.get(WORKER_ENV, str(os.getpid()))
    line = f"{kind} {ctx.batch_id} {ctx.index} {ctx.attempt} {worker} {time.time():.6f} {int(ctx.cancelled)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@batch_handler("cluster.sleep", params=ClusterSleepParams)
async def cluster_sleep(params: dict[str, Any], ctx: ItemContext) -> dict[str, float]:
    """Sleeps `seconds` between a recorded start and end (cooperative unless told not to)."""
    _record("start", ctx)
    try:
        if params["cooperative"]:
            await ctx.sleep(params["seconds"])
        else:
            await asyncio.sleep(params["seconds"])
    finally:
        _record("end", ctx)
    return {"slept": params["seconds"]}


class FixedRetry(Retry):
    """Retries after exactly `max_delay` seconds (no jitter), so a test can see the wait."""

    def delay(self, attempt: int) -> float:
        return self.max_delay


class FlakyParams(serializers.Serializer[Any]):
    seconds = serializers.FloatField(min_value=0, max_value=60, default=0)
    fail_attempts = serializers.IntegerField(min_value=0, max_value=100, default=1)
    error = serializers.ChoiceField(choices=["connection", "value"], default="connection")


FLAKY_RETRY = FixedRetry(attempts=3, max_delay=float(os.environ.get("CLUSTER_RETRY_DELAY", "1")), on=(ConnectionError,))


def _flaky_outcome(params: dict[str, Any], ctx: ItemContext) -> dict[str, int]:
    if ctx.attempt <= params["fail_attempts"]:
        kind = ConnectionError if params["error"] == "connection" else ValueError
        raise kind(f"attempt {ctx.attempt} failed")
    return {"attempt": ctx.attempt}


@batch_handler("cluster.flaky", params=FlakyParams, retry=FLAKY_RETRY)
async def cluster_flaky(params: dict[str, Any], ctx: ItemContext) -> dict[str, int]:
    """Sleeps `seconds`, then fails its first `fail_attempts` attempts (ConnectionError: retried)."""
    _record("start", ctx)
    try:
        await ctx.sleep(params["seconds"])
        return _flaky_outcome(params, ctx)
    finally:
        _record("end", ctx)


@batch_handler("cluster.flaky_sync", params=FlakyParams, retry=FLAKY_RETRY)
def cluster_flaky_sync(params: dict[str, Any], ctx: ItemContext) -> dict[str, int]:
    """`cluster.flaky` as a plain `def` handler (it runs in a worker process)."""
    _record("start", ctx)
    try:
        ctx.wait(params["seconds"])
        return _flaky_outcome(params, ctx)
    finally:
        _record("end", ctx)


@dataclass(frozen=True)
class Event:
    kind: str
    batch_id: str
    index: int
    attempt: int
    worker: str
    at: float
    cancelled: bool


def read_events(path: Path) -> list[Event]:
    """The recorded events in file (= real-time) order."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        kind, batch_id, index, attempt, worker, at, cancelled = line.split()
        events.append(Event(kind, batch_id, int(index), int(attempt), worker, float(at), cancelled == "1"))
    return events


def peak_concurrency(events: list[Event], batch_id: str | None = None) -> int:
    """The largest number of handlers running at once, sweeping the events in file order."""
    running = peak = 0
    for event in events:
        if batch_id is not None and event.batch_id != batch_id:
            continue
        running += 1 if event.kind == "start" else -1
        peak = max(peak, running)
    return peak
