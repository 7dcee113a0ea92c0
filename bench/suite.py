"""Run scenarios and collect a results document (needs a configured Django)."""

from __future__ import annotations

import logging
import time
from typing import Any

from bench import SCENARIOS, report
from bench.client import Client, api_client, service_client
from bench.harness import reset_tables
from bench.scenarios import Case, build

logger = logging.getLogger(__name__)


def run_suite(
    scenarios: list[str] | None,
    *,
    quick: bool = False,
    repeat: int | None = None,
    via: str = "api",
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Every case of the chosen scenarios (default all), each repeated; summaries and targets.

    `via`: "api" submits and cancels through a real API server, "services" calls services.
    `sizes`: item counts instead of the catalogue's (`{"io": 5}`).
    """
    catalogue = build(quick=quick, repeat=repeat, sizes=sizes)
    with api_client() if via == "api" else service_client() as client:
        results = _run(catalogue, client, scenarios or SCENARIOS)
    reset_tables()
    return {
        "environment": report.environment(),
        "quick": quick,
        "via": client.via,
        "sizes": sizes or {},
        "results": results,
        "targets": report.evaluate(results),
    }


def _run(catalogue: dict[str, list[Case]], client: Client, scenarios: list[str]) -> list[dict[str, Any]]:
    results = []
    for name in scenarios:
        for case in catalogue[name]:
            logger.info("running %s / %s x %d: %s", case.scenario, case.label, case.repeat, case.description)
            started = time.monotonic()
            runs = case.run(client, case.repeat)
            summary = report.summarize(runs)
            results.append(
                {
                    "scenario": case.scenario,
                    "label": case.label,
                    "description": case.description,
                    "runs": runs,
                    "summary": summary,
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
            logger.info("%s / %s: %s", case.scenario, case.label, _brief(summary))
    return results


def _brief(summary: report.Summary) -> str:
    return ", ".join(f"{name}={stats['median']:.4g}" for name, stats in summary.items())
