"""Worker processes, /proc readings and database helpers the scenarios share."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.db import connection

from batch.models import TERMINAL_BATCH_STATUSES, BatchJob, BatchWorker
from batchsite.env import current_database_url
from bench.handlers import REDIS_URL_ENV, counter_key, redis_url

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WORKER_ROOT = ROOT  # the checkout whose engine the workers and API server run (`--repo`)


database_url = current_database_url  # the workers it starts use this process's database


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


# --- /proc ----------------------------------------------------------------------------------


def _stat_fields(stat: Path) -> list[str]:
    raw = stat.read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its children, from
    /proc: live children by their own stat, reaped ones through the parent's cutime +
    cstime. A pool of handler processes does the worker's work, so it counts as the worker's."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    total = sum(int(x) for x in fields[11:15])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = _stat_fields(stat)
        except OSError:  # the process ended
            continue
        if child[1] == str(pid):
            total += int(child[11]) + int(child[12])
    return total / CLOCK_TICKS


def postgres_cpu_seconds() -> float:
    """CPU time of the local PostgreSQL server's live processes (0 if it runs elsewhere).

    Backends that exit between two readings drop out, so differences slightly undercount;
    the workers' own backends live for the whole run."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:  # the process ended
            continue
        if raw[raw.index("(") + 1 : raw.rindex(")")] == "postgres":
            fields = raw[raw.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (user, nice, system, irq, softirq, steal), /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


# --- workers --------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """One `manage.py runbatch` subprocess with its own application_name and log file."""

    tag: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class WorkerSpec:
    concurrency: int = 16
    global_cap: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)


def manage_py(*args: str) -> list[str]:
    """The command running `manage.py args` of WORKER_ROOT with this checkout's bench handlers."""
    return [sys.executable, str(ROOT / "bench" / "launch.py"), str(WORKER_ROOT), *args]


def start_worker(spec: WorkerSpec, log_dir: Path) -> WorkerProcess:
    tag = f"bench-worker-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "PGAPPNAME": tag,  # libpq default for every connection of the worker, listener included
        "BATCH_GLOBAL_MAX_PARALLEL": str(spec.global_cap),
        "DJANGO_LOG_LEVEL": "WARNING",
        # Production settings: with DEBUG every query is also recorded in connection.queries.
        "DJANGO_DEBUG": "0",
        "BATCH_DEMO_HANDLERS": "1",  # they run demo.* handlers
        "DJANGO_SECRET_KEY": "bench-" + "x" * 50,
        "PYTHONUNBUFFERED": "1",
        "BATCH_HANDLER_MODULES": "bench.handlers",
        REDIS_URL_ENV: redis_url(),
        **spec.extra_env,
    }
    env.pop("DATABASE_TEST_NAME", None)
    log_path = log_dir / f"{tag}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            manage_py("runbatch", "--progress", "never", "--concurrency", str(spec.concurrency), "--worker-id", tag),
            cwd=WORKER_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return WorkerProcess(tag=tag, process=process, log_path=log_path)


def wait_ready(worker: WorkerProcess, timeout: float = 60.0) -> None:
    """Until the worker is registered and (PostgreSQL) listening for notifications."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker {worker.tag} exited early:\n{worker.log_tail()}")
        if _is_ready(worker):
            return
        time.sleep(0.02)
    raise TimeoutError(f"worker {worker.tag} not ready after {timeout} s:\n{worker.log_tail()}")


def _is_ready(worker: WorkerProcess) -> bool:
    if not BatchWorker.objects.filter(pk=worker.tag, stopped_at__isnull=True).exists():
        return False
    if not is_postgres():
        return True
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN%%'", [worker.tag]
        )
        return cursor.fetchone() is not None


def stop_worker(worker: WorkerProcess, timeout: float = 30.0) -> None:
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait(timeout=10)


PROFILE_DIR: Path | None = None  # set by `--profile`: py-spy records every worker


@contextlib.contextmanager
def running_workers(specs: list[WorkerSpec]) -> Iterator[list[WorkerProcess]]:
    """Start the workers together, wait until every one is ready, stop them afterwards."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    workers = [start_worker(spec, log_dir) for spec in specs]
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        for worker in workers:
            wait_ready(worker)
        profilers = [_profile(worker, PROFILE_DIR) for worker in workers if PROFILE_DIR is not None]
        yield workers
    finally:
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        for worker in workers:
            stop_worker(worker)


def _profile(worker: WorkerProcess, out_dir: Path) -> subprocess.Popen[bytes]:
    """py-spy (requirements-dev.txt) sampling the worker into collapsed stacks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).with_name("py-spy")
    command = [str(pyspy), "record", "--pid", str(worker.pid), "--format", "raw", "--rate", "250"]
    command += ["--output", str(out_dir / f"{worker.tag}.txt"), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- database -------------------------------------------------------------------------------


def reset_tables() -> None:
    """Empty the engine's tables (and any that reference batches): same start every repetition."""
    # Not batch_job itself (`retry_of` refers to it): it is emptied after the tables that reference it.
    referencing = [rel.related_model for rel in BatchJob._meta.related_objects if rel.related_model is not BatchJob]
    related = sorted({model._meta.db_table for model in referencing})
    tables = [connection.ops.quote_name(t) for t in [*related, "batch_job", "batch_worker"]]
    with connection.cursor() as cursor:
        if is_postgres():
            cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
        else:
            for table in tables:
                cursor.execute(f"DELETE FROM {table}")


def wait_terminal(batch_id: uuid.UUID, *, timeout: float, interval: float = 0.01) -> BatchJob:
    """Poll until the batch is terminal; returns it (with finished_at set by the worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = BatchJob.objects.get(pk=batch_id)
        if batch.status in TERMINAL_BATCH_STATUSES:
            return batch
        time.sleep(interval)
    raise TimeoutError(f"batch {batch_id} not terminal after {timeout} s")


def wait_running(batch_id: uuid.UUID, count: int, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while BatchJob.objects.get(pk=batch_id).running_items < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id}: fewer than {count} items running after {timeout} s")
        time.sleep(0.005)


class ConnectionSampler:
    """Samples pg_stat_activity on its own connection: the most backends an app name held."""

    def __init__(self, app_names: list[str], interval: float = 0.01) -> None:
        self.app_names = app_names
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pg-sampler", daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import psycopg

        params = connection.settings_dict
        with psycopg.connect(
            dbname=params["NAME"],
            user=params.get("USER") or "postgres",
            host=params.get("HOST") or "127.0.0.1",
            port=params.get("PORT") or 5432,
            password=params.get("PASSWORD") or None,
            autocommit=True,
        ) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(%s)", [self.app_names]
                ).fetchone()
                self.peak = max(self.peak, int(row[0]) if row else 0)
                self.samples += 1
                self._stop.wait(self.interval)


# --- Redis (the local service of `io` and `sleep-io`) ---------------------------------------


def take_round_trips(batch_id: uuid.UUID) -> int:
    """How many round trips the handlers of `batch_id` made (their counter), and drop it."""
    import redis

    with redis.Redis.from_url(redis_url()) as client:
        key = counter_key(batch_id)
        count = int(client.get(key) or 0)
        client.delete(key)
    return count


def round_trip_seconds(samples: int = 200) -> float:
    """Median time of one INCR from an asyncio client on this machine, as a handler does it."""
    import asyncio
    import statistics

    import redis.asyncio as aioredis

    async def measure() -> float:
        client = aioredis.Redis.from_url(redis_url())
        key = counter_key("rtt")
        try:
            await client.incr(key)  # connect outside the timing
            times = []
            for _ in range(samples):
                started = time.perf_counter()
                await client.incr(key)
                times.append(time.perf_counter() - started)
            await client.delete(key)
        finally:
            await client.aclose()
        return statistics.median(times)

    return asyncio.run(measure())
