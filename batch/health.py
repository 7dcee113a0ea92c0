"""Cluster health for orchestrators: workers seen, their heartbeats, stuck leases. Reads only.

`manage.py batchhealth` and `GET /health/` both report `cluster_health()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Min
from django.utils import timezone

from batch.models import BatchJob, BatchJobItem, BatchStatus, BatchWorker, ItemStatus


@dataclass(frozen=True)
class WorkerHealth:
    id: str
    hostname: str
    pid: int
    concurrency: int
    heartbeat_age: float  # seconds since its last heartbeat
    alive: bool


@dataclass(frozen=True)
class ClusterHealth:
    checked_at: datetime
    stale_after: float  # a worker whose heartbeat is older than this is counted dead
    workers: list[WorkerHealth]
    active_batches: int
    running_items: int
    stuck_leases: int  # running items whose lease expired over a grace period ago
    oldest_stuck_lease_age: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def alive_workers(self) -> int:
        return sum(1 for worker in self.workers if worker.alive)

    def as_dict(self, *, public: bool = False) -> dict[str, Any]:
        """JSON-ready; `public` leaves out worker ids, hosts and pids (for the open HTTP check)."""
        data = asdict(self)
        data.update(checked_at=self.checked_at.isoformat(), healthy=self.healthy, alive_workers=self.alive_workers)
        if public:
            data["workers"] = [{"heartbeat_age": w.heartbeat_age, "alive": w.alive} for w in self.workers]
        return data


def cluster_health(*, min_workers: int = 1, worker_id: str | None = None) -> ClusterHealth:
    """Healthy when at least `min_workers` heartbeat (and `worker_id`, if given, is one of
    them) and no lease stayed expired past a grace period (live workers take expired leases
    back on every heartbeat, so one that lingers means nobody is recovering)."""
    now = timezone.now()
    stale_after = settings.BATCH_LEASE_SECONDS
    workers = _workers(now, stale_after)
    grace = timedelta(seconds=2 * settings.BATCH_HEARTBEAT_SECONDS)
    running = BatchJobItem.objects.filter(status=ItemStatus.RUNNING)
    stuck = running.filter(lease_expires_at__lt=now - grace)
    oldest = stuck.aggregate(oldest=Min("lease_expires_at"))["oldest"]
    health = ClusterHealth(
        checked_at=now,
        stale_after=stale_after,
        workers=workers,
        active_batches=BatchJob.objects.filter(status__in=_ACTIVE).count(),
        running_items=running.count(),
        stuck_leases=stuck.count(),
        oldest_stuck_lease_age=round((now - oldest).total_seconds(), 3) if oldest else None,
    )
    health.problems.extend(_problems(health, min_workers=min_workers, worker_id=worker_id))
    return health


_ACTIVE = [BatchStatus.PENDING, BatchStatus.RUNNING, BatchStatus.PAUSED, BatchStatus.CANCELLING]


def _workers(now: datetime, stale_after: float) -> list[WorkerHealth]:
    rows = BatchWorker.objects.filter(stopped_at__isnull=True).order_by("pk")
    result = []
    for row in rows:
        age = round((now - row.heartbeat_at).total_seconds(), 3)
        result.append(WorkerHealth(row.pk, row.hostname, row.pid, row.concurrency, age, age <= stale_after))
    return result


def _problems(health: ClusterHealth, *, min_workers: int, worker_id: str | None) -> list[str]:
    problems = []
    if health.alive_workers < min_workers:
        problems.append(f"{health.alive_workers} live worker(s), at least {min_workers} required")
    if worker_id is not None and not any(w.id == worker_id and w.alive for w in health.workers):
        problems.append(f"worker {worker_id!r} has no heartbeat in the last {health.stale_after:g} s")
    if health.stuck_leases:
        problems.append(f"{health.stuck_leases} running item(s) with an expired lease nobody took back")
    return problems
