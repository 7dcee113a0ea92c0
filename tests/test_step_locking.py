"""PostgreSQL: the step writes a worker's completions before it waits for the batch lock.

Two workers on one batch then write their completions at the same time; only the claim and
the counters wait for the lock. Whoever holds the batch lock and takes item rows (lease
recovery) must not wait for rows a waiting step holds, or the two deadlock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.services import Outcome
from batch.services._base import lock_batch

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
TIMEOUT = 20


def _waiting_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        return bool(cursor.fetchone()[0])


def _until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class StepThread(threading.Thread):
    """Completes `items` for worker w1 on a connection of its own."""

    def __init__(self, batch: BatchJob, items: list[services.ClaimedItem]) -> None:
        super().__init__(daemon=True)
        self.batch, self.items = batch, items
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            outcomes = [Outcome(item.id, ItemStatus.SUCCEEDED) for item in self.items]
            services.complete_items(batch_id=self.batch.id, worker_id="w1", outcomes=outcomes)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()


@pytest.fixture
def running() -> tuple[BatchJob, list[services.ClaimedItem]]:
    batch = services.submit_batch(handler="demo.sleep", items=[{"seconds": 0}] * 4, max_parallel=4).batch
    items = services.claim_items(batch_id=batch.id, worker_id="w1", limit=4, lease_seconds=30).items
    assert len(items) == 4
    return batch, items


def test_completions_are_written_before_the_step_waits_for_the_batch_lock(running: Any) -> None:
    batch, items = running
    step = StepThread(batch, items)
    with transaction.atomic():
        lock_batch(batch.id)  # another worker's step, say, holds it
        step.start()
        _until(_waiting_for_a_lock)
        # The waiting step has already written the completions: their rows are its.
        with pytest.raises(OperationalError), transaction.atomic():
            list(BatchJobItem.objects.select_for_update(nowait=True).filter(pk__in=[i.id for i in items]))
    step.join(TIMEOUT)
    assert step.error is None
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items, batch.running_items) == (BatchStatus.SUCCEEDED, 4, 0)


def test_lease_recovery_under_the_batch_lock_skips_rows_a_waiting_step_writes(running: Any) -> None:
    batch, items = running
    BatchJobItem.objects.filter(batch=batch).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    step = StepThread(batch, items)
    with transaction.atomic():
        lock_batch(batch.id)
        step.start()
        _until(_waiting_for_a_lock)
        # Waiting for those rows here would deadlock with the step (it waits for our lock).
        assert services.recover_expired_leases() == 0
    step.join(TIMEOUT)
    assert step.error is None
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items, batch.running_items) == (BatchStatus.SUCCEEDED, 4, 0)
