"""Every benchmark scenario once at its smallest size (`--quick`): sane results, no timing asserted."""

from __future__ import annotations

import math
from typing import Any

import pytest
from django.db import connection

from bench import SCENARIOS, report
from bench.suite import run_suite

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.django_db(transaction=True)]


def _case(document: dict[str, Any], scenario: str, label: str) -> dict[str, Any]:
    return next(c for c in document["results"] if c["scenario"] == scenario and c["label"] == label)


def _median(case: dict[str, Any], metric: str) -> float:
    value = case["summary"][metric]["median"]
    assert math.isfinite(value), f"{case['scenario']}/{case['label']}: {metric} is {value}"
    return float(value)


@pytest.fixture(scope="module")
def quick_results(django_db_setup: None, django_db_blocker: Any) -> dict[str, Any]:
    with django_db_blocker.unblock():
        return run_suite(None, quick=True)


def test_every_scenario_ran_every_case(quick_results: dict[str, Any]) -> None:
    assert sorted({c["scenario"] for c in quick_results["results"]}) == sorted(SCENARIOS)
    assert quick_results["via"].startswith("REST API")
    assert all(c["runs"] for c in quick_results["results"])


def test_throughput_scenarios_finish_every_item(quick_results: dict[str, Any]) -> None:
    for case in quick_results["results"]:
        if case["scenario"] in ("noop", "sleep", "memory", "connections", "scale", "scale16"):
            for run in case["runs"]:
                assert run["succeeded"] == run["items"] > 0, (case["scenario"], case["label"], run)
    for label in ("cap 4", "cap 32"):
        noop = _case(quick_results, "noop", label)
        assert _median(noop, "items_per_s") > 0
        assert _median(noop, "worker_cpu_us_per_item") >= 0
    assert _median(_case(quick_results, "sleep", "4"), "ratio_to_ideal") > 0


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
    assert {row["scenario"] for row in rows} == set(SCENARIOS)
    postgres_only = {"connections"} if connection.vendor != "postgresql" else set()
    assert all(row["measured"] is not None for row in rows if row["scenario"] not in postgres_only)
    json_path, md_path = report.write(quick_results, tmp_path)
    assert json_path.exists()
    assert "| noop | cap 4 | items_per_s |" in md_path.read_text()
