"""The scenarios of issue 7. Each case returns one metrics dict per repetition."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batch import services
from batch.models import BatchJob, BatchStatus
from bench import SIZABLE
from bench import handlers as _handlers  # noqa: F401  (registers bench.*: a submit validates items)
from bench.client import Client
from bench.harness import (
    ConnectionSampler,
    WorkerProcess,
    WorkerSpec,
    cpu_seconds,
    is_postgres,
    machine_busy_seconds,
    peak_rss_mib,
    postgres_cpu_seconds,
    reset_tables,
    round_trip_seconds,
    running_workers,
    take_round_trips,
    wait_running,
    wait_terminal,
)

logger = logging.getLogger(__name__)

Metrics = dict[str, float]
RunCase = Callable[[Client, int], list[Metrics]]
TERMINAL_TIMEOUT = 900.0


@dataclass(frozen=True)
class Case:
    scenario: str
    label: str
    run: RunCase
    repeat: int
    description: str


# --- building blocks ------------------------------------------------------------------------


def _noop_items(count: int) -> list[dict[str, Any]]:
    return [{} for _ in range(count)]


def _measure_batch(
    workers: list[WorkerProcess], *, handler: str, items: list[dict[str, Any]], cap: int
) -> tuple[Metrics, uuid.UUID]:
    """Submit through services, wait for the terminal state; wall clock and worker CPU."""
    cpu_before = sum(cpu_seconds(w.pid) for w in workers)
    busy_before = machine_busy_seconds()
    postgres_before = postgres_cpu_seconds()
    started = time.time()
    batch_id = services.submit_batch(handler=handler, items=items, max_parallel=cap).batch.id
    submitted = time.time()
    batch = wait_terminal(batch_id, timeout=TERMINAL_TIMEOUT)
    cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
    busy = machine_busy_seconds() - busy_before
    postgres = postgres_cpu_seconds() - postgres_before
    assert batch.finished_at is not None
    assert batch.started_at is not None
    count = len(items)
    wall = batch.finished_at.timestamp() - started
    return {
        "items_per_s": count / wall,
        "run_items_per_s": count / max(batch.finished_at.timestamp() - batch.started_at.timestamp(), 1e-6),
        "wall_s": wall,
        "submit_s": submitted - started,
        "worker_cpu_us_per_item": cpu / count * 1e6,
        "postgres_cpu_us_per_item": postgres / count * 1e6,
        # Cores busy on the whole machine meanwhile (workers, PostgreSQL, this process, others).
        "machine_cores_busy": busy / max(time.time() - started, 1e-6),
        "succeeded": batch.succeeded_items,
        "items": count,
    }, batch_id


def _spec(cap: int, concurrency: int | None = None) -> WorkerSpec:
    """Cap 4 runs with the default worker concurrency (16); larger caps raise it to the cap."""
    return WorkerSpec(concurrency=concurrency or max(cap, 16), global_cap=cap)


def _noop(items: int, cap: int, workers: int = 1, concurrency: int | None = None) -> RunCase:
    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(cap, concurrency)] * workers) as procs:
                metrics, _ = _measure_batch(procs, handler="demo.noop", items=_noop_items(items), cap=cap)
            results.append(metrics)
        return results

    return run


def _sleep(items: int, seconds: float, cap: int) -> RunCase:
    ideal = items / cap * seconds

    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(cap)]) as procs:
                params = [{"seconds": seconds} for _ in range(items)]
                metrics, _ = _measure_batch(procs, handler="demo.sleep", items=params, cap=cap)
            results.append({**metrics, "ideal_s": ideal, "ratio_to_ideal": metrics["wall_s"] / ideal})
        return results

    return run


def _cancel(running: int, cap: int) -> RunCase:
    """Each repetition: a batch of cooperative 60 s sleeps, `running` of them running; cancel it.

    One unrecorded cancel first warms the API server (imports, token lookup, its listener).
    """

    def run(client: Client, repeat: int) -> list[Metrics]:
        reset_tables()
        results = []
        with running_workers([_spec(cap)]):
            for attempt in range(repeat + 1):
                params = [{"seconds": 60, "cooperative": True} for _ in range(running * 2)]
                batch_id = services.submit_batch(handler="demo.sleep", items=params, max_parallel=cap).batch.id
                wait_running(batch_id, running)
                started = time.perf_counter()
                status = client.cancel(batch_id)
                latency = time.perf_counter() - started
                batch = BatchJob.objects.get(pk=batch_id)
                assert batch.cancel_requested_at is not None
                assert batch.finished_at is not None
                drain = (batch.finished_at - batch.cancel_requested_at).total_seconds()
                if attempt == 0:
                    continue
                results.append(
                    {
                        "latency_ms": latency * 1000,
                        "drain_ms": drain * 1000,  # recorded request -> batch cancelled, worker side
                        "cancelled": float(status == BatchStatus.CANCELLED),
                    }
                )
        return results

    return run


def _memory(items: int) -> RunCase:
    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(4)]) as procs:
                idle = peak_rss_mib(procs[0].pid)
                metrics, _ = _measure_batch(procs, handler="demo.noop", items=_noop_items(items), cap=4)
                peak = peak_rss_mib(procs[0].pid)
            results.append({"peak_rss_mib": peak, "idle_rss_mib": idle, **metrics})
        return results

    return run


def _connections(items: int, cap: int) -> RunCase:
    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(cap)]) as procs:
                if not is_postgres():
                    metrics, _ = _measure_batch(procs, handler="demo.noop", items=_noop_items(items), cap=cap)
                    results.append({"succeeded": metrics["succeeded"], "items": metrics["items"]})
                    continue
                with ConnectionSampler([w.tag for w in procs]) as sampler:
                    metrics, _ = _measure_batch(procs, handler="demo.noop", items=_noop_items(items), cap=cap)
            pool = float(os.environ.get("DATABASE_POOL_MAX_SIZE", "4"))
            results.append(
                {"max_connections": float(sampler.peak), "samples": float(sampler.samples), "pool_max_size": pool}
                | {"succeeded": metrics["succeeded"], "items": metrics["items"]}
            )
        return results

    return run


def _submit(items: int) -> RunCase:
    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            payload = _noop_items(items)
            started = time.perf_counter()
            batch_id = client.submit("demo.noop", payload, max_parallel=4)
            elapsed = time.perf_counter() - started
            stored = BatchJob.objects.get(pk=batch_id).total_items
            results.append({"submit_s": elapsed, "items_per_s": items / elapsed, "stored_items": stored})
        reset_tables()
        return results

    return run


def _io(items: int, cap: int) -> RunCase:
    """`bench.io`: each item awaits one Redis round trip; `round_trips` counts them."""

    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(cap)]) as procs:
                metrics, batch_id = _measure_batch(procs, handler="bench.io", items=_noop_items(items), cap=cap)
            results.append({**metrics, "round_trips": float(take_round_trips(batch_id))})
        return results

    return run


def _sleep_io(items: int, seconds: float, cap: int) -> RunCase:
    """`bench.sleep_io` (round trip, sleep, round trip); ideal: ceil(items / cap) rounds of
    the sleep plus two round trips as this process measures them just before."""

    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(cap)]) as procs:
                rtt = round_trip_seconds()
                ideal = math.ceil(items / cap) * (seconds + 2 * rtt)
                params = [{"seconds": seconds} for _ in range(items)]
                metrics, batch_id = _measure_batch(procs, handler="bench.sleep_io", items=params, cap=cap)
            trips = float(take_round_trips(batch_id))
            results.append(
                {**metrics, "ideal_s": ideal, "ratio_to_ideal": metrics["wall_s"] / ideal, "rtt_us": rtt * 1e6}
                | {"round_trips": trips}
            )
        return results

    return run


def _forecast_items(count: int) -> list[dict[str, Any]]:
    return [{"store": f"S{i % 50:02d}", "product": f"P{i:05d}", "horizon": 28} for i in range(count)]


def _cpu(items: int, cap: int) -> RunCase:
    """`demo.forecast` (sync, CPU-bound) at parallel 1 and at `cap` on one worker, one after
    the other in each repetition (a pair close in time, so drift hits both); `speedup` is their
    ratio. An unrecorded warm-up batch first starts whatever pool runs sync handlers."""

    def run(client: Client, repeat: int) -> list[Metrics]:
        results = []
        for _ in range(repeat):
            reset_tables()
            with running_workers([_spec(cap)]) as procs:
                _measure_batch(procs, handler="demo.forecast", items=_forecast_items(cap * 2), cap=cap)
                serial, _ = _measure_batch(procs, handler="demo.forecast", items=_forecast_items(items), cap=1)
                parallel, _ = _measure_batch(procs, handler="demo.forecast", items=_forecast_items(items), cap=cap)
            results.append(
                {f"p1_{name}": value for name, value in serial.items()}
                | {f"p{cap}_{name}": value for name, value in parallel.items()}
                | {
                    "speedup": parallel["items_per_s"] / serial["items_per_s"],
                    f"p{cap}_worker_cores": parallel["worker_cpu_us_per_item"] * parallel["items_per_s"] / 1e6,
                    "succeeded": serial["succeeded"] + parallel["succeeded"],
                    "items": serial["items"] + parallel["items"],
                }
            )
        return results

    return run


# --- the catalogue --------------------------------------------------------------------------

Sizes = dict[str, Any]
FULL: Sizes = {"noop": 10_000, "sleep": 200, "cancel": 20, "memory": (1_000, 100_000), "submit": (10_000, 100_000)}
FULL |= {"io": 10_000, "sleep-io": 200, "cpu": 2_000}
QUICK: Sizes = {"noop": 200, "sleep": 8, "cancel": 2, "memory": (100, 1_000), "submit": (100, 1_000)}
QUICK |= {"io": 50, "sleep-io": 8, "cpu": 8}
assert sorted(name for name, size in FULL.items() if isinstance(size, int)) == SIZABLE


def build(*, quick: bool, repeat: int | None, sizes: Sizes | None = None) -> dict[str, list[Case]]:
    """Every scenario's cases, at full size (default repetitions 5, 3 for heavy ones) or quick;
    `sizes` overrides single item counts (`{"io": 5}`)."""
    size = (QUICK if quick else FULL) | (sizes or {})

    def reps(default: int) -> int:
        return 1 if quick and repeat is None else (repeat or default)

    noop, (mem_small, mem_big), (sub_small, sub_big) = size["noop"], size["memory"], size["submit"]
    sleep_items, io, sleep_io, cpu = size["sleep"], size["io"], size["sleep-io"], size["cpu"]
    cancels = size["cancel"] if repeat is None else repeat
    return {
        "noop": [
            Case("noop", "cap 4", _noop(noop, 4), reps(5), f"{noop} demo.noop, global cap 4"),
            Case("noop", "cap 32", _noop(noop, 32), reps(5), f"{noop} demo.noop, global cap 32, --concurrency 32"),
        ],
        "sleep": [
            Case("sleep", "4", _sleep(sleep_items, 0.05, 4), reps(5), f"{sleep_items} x 50 ms demo.sleep at 4"),
        ],
        "io": [Case("io", "cap 4", _io(io, 4), reps(5), f"{io} bench.io (one Redis round trip), global cap 4")],
        "sleep-io": [
            Case(
                "sleep-io",
                "4",
                _sleep_io(sleep_io, 0.05, 4),
                reps(5),
                f"{sleep_io} bench.sleep_io (round trip, 50 ms sleep, round trip) at 4",
            )
        ],
        "cpu": [
            Case("cpu", "p4 / p1", _cpu(cpu, 4), reps(3), f"{cpu} demo.forecast at parallel 1, then at 4 (one worker)")
        ],
        "cancel": [Case("cancel", "4 running", _cancel(4, 4), cancels, "cancel a batch with 4 cooperative sleeps")],
        "memory": [
            Case("memory", f"{mem_small}", _memory(mem_small), reps(3), f"{mem_small}-item noop batch, cap 4"),
            Case("memory", f"{mem_big}", _memory(mem_big), reps(3), f"{mem_big}-item noop batch, cap 4"),
        ],
        "connections": [
            Case("connections", "parallel 4", _connections(noop, 4), reps(3), f"{noop} noop at cap 4"),
            Case("connections", "parallel 32", _connections(noop, 32), reps(3), f"{noop} noop at cap 32"),
        ],
        "submit": [
            Case("submit", f"{sub_small}", _submit(sub_small), reps(5), f"submit {sub_small} noop items"),
            Case("submit", f"{sub_big}", _submit(sub_big), reps(3), f"submit {sub_big} noop items"),
        ],
        "scale": [
            Case("scale", f"{n} worker(s)", _noop(noop, 32, workers=n), reps(3), f"{noop} noop, cap 32, {n} workers")
            for n in (1, 2, 3)
        ],
        # Each worker at the default concurrency (16): two workers fill the cap of 32 together.
        # Above, one worker at 32 fills it alone and keeps it (every finished item hands its
        # slot to a reserved one), so a second worker finds the cap full.
        "scale16": [
            Case(
                "scale16",
                f"{n} worker(s)",
                _noop(noop, 32, workers=n, concurrency=16),
                reps(3),
                f"{noop} noop, cap 32, {n} workers at concurrency 16",
            )
            for n in (1, 2, 3)
        ],
    }
