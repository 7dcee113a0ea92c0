"""Every benchmark scenario once at its smallest size (`--quick`; the realistic ones at a few
items through `--size`): sane results, no timing asserted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import connection

from bench import NEEDS_REDIS, SCENARIOS, report
from bench.__main__ import parse_args
from bench.handlers import redis_url
from bench.suite import run_suite
from tests.conftest import SERVICE_SKIP, service_reachable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.django_db(transaction=True)]

TINY = ["--size", "io=5", "--size", "sleep-io=6", "--size", "cpu=4"]


def _redis_up() -> bool:
    url = urlsplit(redis_url())
    return service_reachable(url.hostname or "127.0.0.1", url.port or 6379)


def _ran(document: dict[str, Any]) -> set[str]:
    return {c["scenario"] for c in document["results"]}


def _case(document: dict[str, Any], scenario: str, label: str) -> dict[str, Any]:
    return next(c for c in document["results"] if c["scenario"] == scenario and c["label"] == label)


def _median(case: dict[str, Any], metric: str) -> float:
    value = case["summary"][metric]["median"]
    assert math.isfinite(value), f"{case['scenario']}/{case['label']}: {metric} is {value}"
    return float(value)


@pytest.fixture(scope="module")
def quick_results(django_db_setup: None, django_db_blocker: Any) -> dict[str, Any]:
    sizes = parse_args(TINY).sizes
    scenarios = [s for s in SCENARIOS if _redis_up() or s not in NEEDS_REDIS]
    with django_db_blocker.unblock():
        return run_suite(scenarios, quick=True, sizes=sizes)


@pytest.fixture
def redis_results(quick_results: dict[str, Any]) -> dict[str, Any]:
    if not _redis_up():
        pytest.skip(f"{SERVICE_SKIP} Redis at {redis_url()}")
    return quick_results


def test_every_scenario_ran_every_case(quick_results: dict[str, Any]) -> None:
    expected = set(SCENARIOS) if _redis_up() else set(SCENARIOS) - NEEDS_REDIS
    assert _ran(quick_results) == expected
    assert quick_results["via"].startswith("REST API")
    assert all(c["runs"] for c in quick_results["results"])


def test_throughput_scenarios_finish_every_item(quick_results: dict[str, Any]) -> None:
    for case in quick_results["results"]:
        if case["scenario"] in ("noop", "sleep", "memory", "connections", "scale", "scale16", "io", "sleep-io", "cpu"):
            for run in case["runs"]:
                assert run["succeeded"] == run["items"] > 0, (case["scenario"], case["label"], run)
    for label in ("cap 4", "cap 32"):
        noop = _case(quick_results, "noop", label)
        assert _median(noop, "items_per_s") > 0
        assert _median(noop, "worker_cpu_us_per_item") >= 0
    assert _median(_case(quick_results, "sleep", "4"), "ratio_to_ideal") > 0


def test_io_items_each_make_their_round_trips(redis_results: dict[str, Any]) -> None:
    io, sleep_io = _case(redis_results, "io", "cap 4"), _case(redis_results, "sleep-io", "4")
    assert [(run["items"], run["succeeded"], run["round_trips"]) for run in io["runs"]] == [(5, 5, 5)]
    assert [(run["items"], run["succeeded"], run["round_trips"]) for run in sleep_io["runs"]] == [(6, 6, 12)]
    assert _median(io, "items_per_s") > 0
    run = sleep_io["runs"][0]
    assert run["ideal_s"] > 2 * 0.05  # ceil(6 / 4) rounds of 50 ms, plus the round trips
    assert run["ratio_to_ideal"] == pytest.approx(run["wall_s"] / run["ideal_s"])
    assert _median(sleep_io, "rtt_us") > 0


def test_cpu_reports_the_speedup_of_each_pair_of_runs(quick_results: dict[str, Any]) -> None:
    (run,) = _case(quick_results, "cpu", "p4 / p1")["runs"]
    assert run["p1_items"] == run["p4_items"] == 4
    assert run["p1_succeeded"] == run["p4_succeeded"] == 4
    assert run["speedup"] == pytest.approx(run["p4_items_per_s"] / run["p1_items_per_s"])
    assert run["p4_worker_cores"] >= 0


def test_sizes_and_checkout_are_validated_on_the_command_line(tmp_path: Path) -> None:
    assert parse_args(TINY).sizes == {"io": 5, "sleep-io": 6, "cpu": 4}
    for bad in (["--size", "memory=5"], ["--size", "io=0"], ["--repo", str(tmp_path)]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    (tmp_path / "manage.py").write_text("")
    assert parse_args(["--repo", str(tmp_path)]).repo == tmp_path.resolve()


def test_cancel_answers_with_the_batch_cancelled(quick_results: dict[str, Any]) -> None:
    case = _case(quick_results, "cancel", "4 running")
    assert [run["cancelled"] for run in case["runs"]] == [1.0] * len(case["runs"])
    assert _median(case, "latency_ms") > 0


def test_memory_connections_submit_report_their_numbers(quick_results: dict[str, Any]) -> None:
    memory = [c for c in quick_results["results"] if c["scenario"] == "memory"]
    assert all(_median(c, "peak_rss_mib") >= _median(c, "idle_rss_mib") > 0 for c in memory)
    for case in (c for c in quick_results["results"] if c["scenario"] == "submit"):
        assert all(run["stored_items"] == int(case["label"]) for run in case["runs"])
    if connection.vendor == "postgresql":
        for case in (c for c in quick_results["results"] if c["scenario"] == "connections"):
            assert _median(case, "max_connections") >= 1  # the worker's listener at least


def test_targets_are_evaluated_and_rendered(quick_results: dict[str, Any], tmp_path: Any) -> None:
    rows = quick_results["targets"]
    assert {row["scenario"] for row in rows} == _ran(quick_results)
    postgres_only = {"connections"} if connection.vendor != "postgresql" else set()
    assert all(row["measured"] is not None for row in rows if row["scenario"] not in postgres_only)
    json_path, md_path = report.write(quick_results, tmp_path)
    assert json_path.exists()
    assert "| noop | cap 4 | items_per_s |" in md_path.read_text()
