"""Item calls beside the hot path: claim and complete in separate calls (scripts, tests), and
release on shutdown. The worker itself goes through `execution.run_step`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.services._base import ClaimedItem, Outcome, Start, Step, finalize_if_done, lock_batch, notify, save_counters
from batch.services.execution import run_step
from batch.services.permits import PermitRequest, sync_permits


def claim_items(*, batch_id: uuid.UUID, worker_id: str, limit: int, lease_seconds: float) -> list[ClaimedItem]:
    """Take permits for `worker_id` and start up to `limit` items within them: a worker's path
    (grant, fetch, start) in three calls, for scripts and tests."""
    running = BatchJobItem.objects.filter(batch_id=batch_id, status=ItemStatus.RUNNING, lease_owner=worker_id).count()
    request = PermitRequest(batch_id, holding=running, demand=running + limit)
    grant = sync_permits(worker_id=worker_id, lease_seconds=lease_seconds, requests=[request])[batch_id]
    wanted = min(limit, grant.allowed - running)
    if wanted <= 0:
        return []
    fetched = run_step(batch_id=batch_id, worker_id=worker_id, lease_seconds=lease_seconds, step=Step(fetch=wanted))
    starts = [Start(item.id) for item in fetched.fetched]
    run_step(batch_id=batch_id, worker_id=worker_id, lease_seconds=lease_seconds, step=Step(started=starts))
    return fetched.fetched


def complete_items(*, batch_id: uuid.UUID, worker_id: str, outcomes: Sequence[Outcome]) -> BatchJob:
    """Record finished items and finalize the batch if done. Raises BatchJob.DoesNotExist."""
    run_step(batch_id=batch_id, worker_id=worker_id, lease_seconds=0, step=Step(outcomes=list(outcomes)))
    return BatchJob.objects.get(pk=batch_id)


def release_items(*, batch_id: uuid.UUID, worker_id: str, item_ids: Sequence[int]) -> int:
    """Give items back: running ones (graceful shutdown) pending again, the attempt not
    counted; held ones unleased. In a cancelling batch both become cancelled instead.

    Returns how many were released.
    """
    with transaction.atomic():
        batch = lock_batch(batch_id)
        mine = BatchJobItem.objects.filter(pk__in=list(item_ids), lease_owner=worker_id)
        running, held = mine.filter(status=ItemStatus.RUNNING), mine.filter(status=ItemStatus.PENDING)
        now = timezone.now()
        cleared = {"lease_owner": "", "lease_expires_at": None}
        if batch.status == BatchStatus.CANCELLING:
            stopped = running.update(
                status=ItemStatus.CANCELLED, finished_at=now, error="Cancelled while its worker shut down.", **cleared
            )
            unstarted = held.update(status=ItemStatus.CANCELLED, finished_at=now, **cleared)
            batch.cancelled_items += stopped + unstarted
        else:
            stopped = running.update(status=ItemStatus.PENDING, attempts=F("attempts") - 1, started_at=None, **cleared)
            unstarted = held.update(**cleared)
        batch.running_items -= stopped
        finalize_if_done(batch, now)
        save_counters(batch)
        notify(batch_id, "released", list(item_ids))
    return stopped + unstarted
