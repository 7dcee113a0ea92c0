"""Eight real `runbatch` processes on one batch (PostgreSQL): the cap, the shares, the counts.

20,000 items of 1 ms at a cap of 32. The peak of running items is sampled from the items table
by a thread of its own while the batch runs (what the database says runs, not what a handler
reports); every worker must run a fair part of the items, and every item runs exactly once.
Larger: BATCH_SCALE_ITEMS=100000.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchStatus
from batch.selectors import counter_mismatches
from tests.cluster_support import Cluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ITEMS = int(os.environ.get("BATCH_SCALE_ITEMS", "20000"))
CAP = 32
WORKERS = 8


class RunningSampler(threading.Thread):
    """Counts the batch's running items in the database until stopped; keeps the peak."""

    def __init__(self, batch: BatchJob) -> None:
        super().__init__(daemon=True)
        self.batch, self.peak, self.samples = batch, 0, 0
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.005):
                running = BatchJobItem.objects.filter(batch=self.batch, status="running").count()
                self.peak, self.samples = max(self.peak, running), self.samples + 1
        finally:
            connections.close_all()


def test_eight_workers_share_one_batch_within_the_cap(start_worker: Any, tmp_path: Path, settings: Any) -> None:
    settings.BATCH_GLOBAL_MAX_PARALLEL = CAP
    cluster = Cluster(start_worker=start_worker, events_file=tmp_path / "events.log")
    # Leases long enough that eight workers and PostgreSQL on two cores never miss a renewal.
    slow_box = {"BATCH_LEASE_SECONDS": "15", "BATCH_HEARTBEAT_SECONDS": "1"}
    cluster.start_many(WORKERS, BATCH_GLOBAL_MAX_PARALLEL=str(CAP), BATCH_WORKER_CONCURRENCY="16", **slow_box)
    items = [{"seconds": 0.001}] * ITEMS
    batch = services.submit_batch(handler="demo.sleep", items=items, max_parallel=CAP).batch
    sampler = RunningSampler(batch)
    sampler.start()
    try:
        cluster.wait_batch(batch, (BatchStatus.SUCCEEDED, BatchStatus.FAILED), timeout=240)
    finally:
        sampler.stopping.set()
        sampler.join(10)
    assert batch.status == BatchStatus.SUCCEEDED, cluster.logs()
    assert sampler.samples > 10 and 0 < sampler.peak <= CAP, f"peak {sampler.peak} over {sampler.samples} samples"
    assert counter_mismatches(batch) == {} and batch.succeeded_items == ITEMS
    assert set(BatchJobItem.objects.filter(batch=batch).values_list("attempts", flat=True)) == {1}, "run twice"
    # Who ran what: the owner of each item is cleared when it finishes, so count starts per worker
    # from the logs' "batch run ended ... started=N" lines, once every worker has stopped.
    assert set(cluster.stop_all().values()) == {0}
    started: Counter[str] = Counter()
    for name, process in cluster.workers.items():
        log = Path(process.log_path).read_text()  # type: ignore[attr-defined]
        started[name] = sum(
            int(part.split("=")[1])
            for line in log.splitlines()
            if "batch run ended" in line
            for part in line.split()
            if part.startswith("started=")
        )
    assert sum(started.values()) == ITEMS, started
    assert min(started.values()) >= 0.05 * ITEMS, f"a worker ran under 5% of the items: {dict(started)}"
