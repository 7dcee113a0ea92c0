"""Helpers for tests that run several real `runbatch` processes against one database."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from batch import services
from batch.models import BatchJob, BatchWorker
from tests.cluster_handlers import EVENTS_ENV, WORKER_ENV, Event, read_events
from tests.conftest import worker_log

T = TypeVar("T")

# Short enough that recovery after a lost worker takes seconds, long enough for a loaded CI box.
FAST_LEASES = {
    "BATCH_LEASE_SECONDS": "2",
    "BATCH_HEARTBEAT_SECONDS": "0.3",
    "BATCH_HANDLER_MODULES": "tests.cluster_handlers",
}

# Three workers with two slots each under a cap of 6: every worker gets items to run (with
# more slots than the cap, the first workers to claim keep a batch to themselves).
SPREAD = {"BATCH_WORKER_CONCURRENCY": "2", "BATCH_GLOBAL_MAX_PARALLEL": "6"}


def wait_until(check: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def submit(count: int, seconds: float, *, max_parallel: int, cooperative: bool = True) -> BatchJob:
    """A batch of `count` instrumented `cluster.sleep` items."""
    items = [{"seconds": seconds, "cooperative": cooperative} for _ in range(count)]
    return services.submit_batch(handler="cluster.sleep", items=items, max_parallel=max_parallel).batch


@dataclass
class Cluster:
    """N workers, each with its own --worker-id and name in the events file."""

    start_worker: Callable[..., subprocess.Popen[str]]
    events_file: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[str]:
        worker_env = {**FAST_LEASES, **self.env, **env, EVENTS_ENV: str(self.events_file), WORKER_ENV: name}
        process = self.start_worker("--worker-id", self.worker_id(name), *args, env=worker_env)
        self.workers[name] = process
        return process

    def start_many(self, count: int, *args: str, **env: str) -> list[str]:
        names = [f"w{i}" for i in range(1, count + 1)]
        for name in names:
            self.start(name, *args, **env)
        self.wait_registered(names)
        return names

    def worker_id(self, name: str) -> str:
        return f"{name}-{self.tag}"

    def wait_registered(self, names: list[str], timeout: float = 30) -> None:
        ids = {self.worker_id(name) for name in names}

        def registered() -> bool:
            self.check_alive()
            return set(BatchWorker.objects.filter(pk__in=ids, stopped_at=None).values_list("pk", flat=True)) == ids

        wait_until(registered, timeout=timeout, what=f"workers {sorted(ids)} to register")

    def check_alive(self) -> None:
        for name, process in self.workers.items():
            if process.poll() is not None and process.returncode not in (0, -9):
                raise AssertionError(f"worker {name} exited with {process.returncode}:\n{worker_log(process)}")

    def events(self) -> list[Event]:
        return read_events(self.events_file)

    def wait_batch(self, batch: BatchJob, statuses: tuple[str, ...], timeout: float) -> BatchJob:
        def finished() -> BatchJob | None:
            self.check_alive()
            batch.refresh_from_db()
            return batch if batch.status in statuses else None

        return wait_until(finished, timeout=timeout, interval=0.1, what=f"batch to reach {statuses}")

    def stop_all(self, timeout: float = 20) -> dict[str, int]:
        """SIGTERM every live worker and wait; returns the exit codes."""
        for process in self.workers.values():
            if process.poll() is None:
                process.terminate()
        return {name: process.wait(timeout=timeout) for name, process in self.workers.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{worker_log(p)}" for name, p in self.workers.items())
