"""Summaries (median, min-max, p99), targets, machine description, JSON and Markdown."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import django
from django.db import connection

from bench import harness
from bench.harness import ROOT

Summary = dict[str, dict[str, float]]


def summarize(runs: list[dict[str, float]]) -> Summary:
    """Per metric: median, min, max and p99 (nearest rank) over the repetitions."""
    metrics: dict[str, list[float]] = {}
    for run in runs:
        for name, value in run.items():
            metrics.setdefault(name, []).append(float(value))
    return {name: _stats(values) for name, values in metrics.items()}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    rank = max(math.ceil(0.99 * len(ordered)), 1)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p99": ordered[rank - 1],
        "n": float(len(ordered)),
    }


# --- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scenario: str
    label: str
    op: str  # ">=" or "<="
    goal: float


TARGETS = [
    Target("noop", "cap 4: items/s (median)", ">=", 3000),
    Target("noop", "cap 32: items/s (median)", ">=", 8000),
    Target("sleep", "wall / ideal (median)", "<=", 1.02),
    Target("cancel", "latency p50 (ms)", "<=", 50),
    Target("cancel", "latency p99 (ms)", "<=", 200),
    Target("memory", "peak RSS big - small batch (MiB, medians)", "<=", 15),
    Target("connections", "max connections at parallel 4 (max over runs)", "<=", 4),
    Target("submit", "big batch: seconds (median)", "<=", 5),
    Target("scale", "2 workers / 1 worker items/s (medians)", ">=", 1.6),
    Target("scale16", "2 workers / 1 worker items/s, each at concurrency 16 (medians)", ">=", 1.6),
    Target("io", "cap 4: items/s (median)", ">=", 5000),
    Target("sleep-io", "wall / ideal (median)", "<=", 1.03),
    Target("cpu", "items/s at 4 / at 1, paired per run (median)", ">=", 1.7),
]


def _measured(scenario: str, cases: list[dict[str, Any]]) -> list[float | None]:
    """The number each target of `scenario` compares, from its cases in catalogue order."""

    def get(index: int, metric: str, stat: str = "median") -> float | None:
        if index >= len(cases):
            return None
        value = cases[index]["summary"].get(metric, {}).get(stat)
        return None if value is None else float(value)

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    table: dict[str, list[float | None]] = {
        "noop": [get(0, "items_per_s"), get(1, "items_per_s")],
        "sleep": [get(0, "ratio_to_ideal")],
        "cancel": [get(0, "latency_ms"), get(0, "latency_ms", "p99")],
        "memory": [diff(get(1, "peak_rss_mib"), get(0, "peak_rss_mib"))],
        "connections": [get(0, "max_connections", "max")],
        "submit": [get(1, "submit_s")],
        "scale": [ratio(get(1, "items_per_s"), get(0, "items_per_s"))],
        "scale16": [ratio(get(1, "items_per_s"), get(0, "items_per_s"))],
        "io": [get(0, "items_per_s")],
        "sleep-io": [get(0, "ratio_to_ideal")],
        "cpu": [get(0, "speedup")],
    }
    return table.get(scenario, [])


def evaluate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for case in results:
        by_scenario.setdefault(case["scenario"], []).append(case)
    rows = []
    for scenario, cases in by_scenario.items():
        targets = [t for t in TARGETS if t.scenario == scenario]
        for target, value in zip(targets, _measured(scenario, cases), strict=False):
            met = None if value is None else (value >= target.goal if target.op == ">=" else value <= target.goal)
            rows.append(
                {"scenario": scenario, "target": target.label, "op": target.op, "goal": target.goal}
                | {
                    "measured": value,
                    "met": met,
                }
            )
    return rows


# --- environment ----------------------------------------------------------------------------


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _git(*args: str, cwd: Path = ROOT) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _commit(cwd: Path) -> str:
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=cwd))
    return _git("rev-parse", "--short", "HEAD", cwd=cwd) + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Machine, versions and commit the numbers belong to."""
    database = connection.vendor
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            database = f"PostgreSQL {cursor.fetchone()[0]}"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "loadavg_at_start": list(os.getloadavg()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "database": database,
        "commit": _commit(ROOT),
        # The engine measured: the checkout the workers and API server run (`--repo`).
        "engine_repo": str(harness.WORKER_ROOT),
        "engine_commit": _commit(harness.WORKER_ROOT),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- output ---------------------------------------------------------------------------------

_SCALE_METRICS = [
    "items_per_s",
    "run_items_per_s",
    "worker_cpu_us_per_item",
    "postgres_cpu_us_per_item",
    "machine_cores_busy",
]
_SHOWN = {
    "noop": [
        "items_per_s",
        "run_items_per_s",
        "worker_cpu_us_per_item",
        "postgres_cpu_us_per_item",
        "machine_cores_busy",
        "submit_s",
    ],
    "sleep": ["wall_s", "ratio_to_ideal"],
    "cancel": ["latency_ms", "drain_ms"],
    "memory": ["peak_rss_mib", "idle_rss_mib", "items_per_s"],
    "connections": ["max_connections"],
    "submit": ["submit_s", "items_per_s"],
    "scale": _SCALE_METRICS,
    "scale16": _SCALE_METRICS,
    "io": [
        "items_per_s",
        "run_items_per_s",
        "worker_cpu_us_per_item",
        "postgres_cpu_us_per_item",
        "machine_cores_busy",
    ],
    "sleep-io": ["wall_s", "ideal_s", "ratio_to_ideal", "rtt_us"],
    "cpu": [
        "p1_items_per_s",
        "p4_items_per_s",
        "speedup",
        "p1_worker_cpu_us_per_item",
        "p4_worker_cpu_us_per_item",
        "p4_worker_cores",
        "p4_machine_cores_busy",
    ],
}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _engine(env: dict[str, Any]) -> str:
    """`; engine <commit> (<path>)` when the workers ran another checkout than the harness."""
    if env.get("engine_repo", str(ROOT)) == str(ROOT):
        return ""
    return f"; engine {env['engine_commit']} ({env['engine_repo']})"


def markdown(document: dict[str, Any]) -> str:
    env = document["environment"]
    lines = [
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['ram_gib']} GiB RAM; load at start "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}",
        f"Versions: Python {env['python']}, Django {env['django']}, {env['database']}; commit {env['commit']}"
        f"{_engine(env)}; "
        f"{env['date']}; submit/cancel via {document['via']}",
        "",
        "| scenario | case | metric | median | min - max | p99 | runs |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for case in document["results"]:
        for metric in _SHOWN.get(case["scenario"], []):
            stats = case["summary"].get(metric)
            if stats is None:
                continue
            lines.append(
                f"| {case['scenario']} | {case['label']} | {metric} | {_fmt(stats['median'])} | "
                f"{_fmt(stats['min'])} - {_fmt(stats['max'])} | {_fmt(stats['p99'])} | {int(stats['n'])} |"
            )
    lines += ["", "| target | goal | measured | met |", "|---|---:|---:|:---:|"]
    for row in document["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        goal = f"{row['op']} {_fmt(row['goal'])}"
        lines.append(f"| {row['scenario']}: {row['target']} | {goal} | {_fmt(row['measured'])} | {met} |")
    return "\n".join(lines) + "\n"


def write(document: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """bench/results/<timestamp>.json and .md; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path, md_path = out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    md_path.write_text(markdown(document))
    return json_path, md_path
