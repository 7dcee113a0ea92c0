"""`manage.py batchhealth`: exit 0 when the worker cluster is healthy, 1 when it is not."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError

from batch.health import ClusterHealth, cluster_health
from batch.management.commands._types import positive_int


class Command(BaseCommand):
    help = "Report workers seen, their heartbeat ages and stuck leases; exit 1 when unhealthy."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument("--min-workers", type=positive_int, default=1, help="live workers required (default 1)")
        parser.add_argument("--worker-id", help="also require this worker's heartbeat (a per-worker liveness probe)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            health = cluster_health(min_workers=options["min_workers"], worker_id=options["worker_id"])
        except DatabaseError as exc:
            self._write({"healthy": False, "problems": [f"database unreachable: {exc}"]}, options["json"])
            raise SystemExit(1) from None
        self._write(health, options["json"])
        if not health.healthy:
            raise SystemExit(1)

    def _write(self, health: ClusterHealth | dict[str, Any], as_json: bool) -> None:
        data = health.as_dict() if isinstance(health, ClusterHealth) else health
        if as_json:
            self.stdout.write(json.dumps(data, indent=2, default=str))
            return
        self.stdout.write(f"{'healthy' if data['healthy'] else 'UNHEALTHY'}")
        for worker in data.get("workers", []):
            state = "alive" if worker["alive"] else "STALE"
            self.stdout.write(f"  worker {worker['id']} {state}, heartbeat {worker['heartbeat_age']:.1f}s ago")
        if "stuck_leases" in data:
            self.stdout.write(f"  running items {data['running_items']}, stuck leases {data['stuck_leases']}")
        for problem in data["problems"]:
            self.stdout.write(f"  problem: {problem}")
