"""Leases and workers: renewal, recovery of items whose worker was lost, worker registration."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.db import transaction

from batch.models import (
    BatchJob,
    BatchJobItem,
    BatchPermit,
    BatchStatus,
    BatchWorker,
    ItemStatus,
)
from batch.services._base import (
    InvalidValue,
    db_now,
    finalize_if_done,
    lock_batch,
    notify,
    save_counters,
)

logger = logging.getLogger(__name__)


def renew_leases(*, worker_id: str, item_ids: Sequence[int], lease_seconds: float) -> int:
    """Extend the leases of the items `worker_id` runs or holds, and its heartbeat.

    Only the ids the worker knows it runs: an item claimed by a transaction whose answer
    was lost (connection dropped at commit) is left to expire and be taken back.
    """
    with transaction.atomic():
        now = db_now()
        BatchWorker.objects.filter(pk=worker_id).update(heartbeat_at=now)
        return BatchJobItem.objects.filter(
            pk__in=list(item_ids), status__in=[ItemStatus.RUNNING, ItemStatus.PENDING], lease_owner=worker_id
        ).update(lease_expires_at=now + timedelta(seconds=lease_seconds))


def recover_expired_leases() -> int:
    """Take back items whose worker stopped renewing their lease.

    Retried (→ pending) while attempts remain, otherwise failed; in a cancelling batch,
    cancelled. Expired holds are cleared (cancelled in a cancelling batch). Judged by the
    database's clock, so a worker whose clock runs ahead recovers nothing early. Returns how
    many items were taken back.
    """
    now = db_now()
    batch_ids = {
        batch_id
        for status in (ItemStatus.RUNNING, ItemStatus.PENDING)
        for batch_id in BatchJobItem.objects.filter(status=status, lease_expires_at__lt=now).values_list(
            "batch_id", flat=True
        )
    }
    taken = 0
    for batch_id in batch_ids:
        with contextlib.suppress(BatchJob.DoesNotExist):  # deleted since the read above
            taken += _recover_batch_leases(batch_id, now)
    return taken


def _recover_batch_leases(batch_id: uuid.UUID, now: datetime) -> int:
    with transaction.atomic():
        batch = lock_batch(batch_id)
        expired = BatchJobItem.objects.filter(batch_id=batch_id, status=ItemStatus.RUNNING, lease_expires_at__lt=now)
        # Rows a worker's step is writing right now are skipped (its worker is alive; the step
        # holds them while it waits for this batch lock, so waiting for them would deadlock).
        taken = list(expired.select_for_update(skip_locked=True).values_list("pk", flat=True))
        expired = expired.filter(pk__in=taken)
        cleared = {"lease_owner": "", "lease_expires_at": None}
        if batch.status == BatchStatus.CANCELLING:
            count = expired.update(
                status=ItemStatus.CANCELLED, finished_at=now, error="Cancelled; its worker was lost.", **cleared
            )
            batch.cancelled_items += count
        else:
            failed = expired.filter(attempts__gte=batch.max_attempts).update(
                status=ItemStatus.FAILED,
                finished_at=now,
                error=f"Its worker was lost (lease expired) on the last of {batch.max_attempts} attempts.",
                **cleared,
            )
            batch.failed_items += failed
            count = failed + expired.update(status=ItemStatus.PENDING, started_at=None, **cleared)
        batch.running_items -= count
        count += _recover_holds(batch, now, taken)
        finalize_if_done(batch, now)
        save_counters(batch)
        notify(batch_id, "recovered", taken)
    if count:
        logger.warning("recovered expired leases", extra={"batch_id": str(batch_id), "items": count})
    return count


def _recover_holds(batch: BatchJob, now: datetime, taken: list[int]) -> int:
    """Clear the expired holds of the locked batch (its worker stopped renewing them)."""
    expired = BatchJobItem.objects.filter(batch_id=batch.id, status=ItemStatus.PENDING, lease_expires_at__lt=now)
    ids = list(expired.select_for_update(skip_locked=True).values_list("pk", flat=True))
    if not ids:
        return 0
    expired = expired.filter(pk__in=ids)
    taken += ids
    cleared = {"lease_owner": "", "lease_expires_at": None}
    if batch.status == BatchStatus.CANCELLING:
        count = expired.update(status=ItemStatus.CANCELLED, finished_at=now, **cleared)
        batch.cancelled_items += count
        return count
    return expired.update(**cleared)


def register_worker(*, worker_id: str, hostname: str, pid: int, concurrency: int, lease_seconds: float) -> None:
    """Record a starting worker; refuse an id whose holder still heartbeats.

    Raises InvalidValue when another live worker already uses `worker_id`.
    """
    with transaction.atomic():
        now = db_now()
        existing = BatchWorker.objects.select_for_update().filter(pk=worker_id).first()
        alive_since = now - timedelta(seconds=lease_seconds)
        if existing and existing.stopped_at is None and existing.heartbeat_at > alive_since:
            raise InvalidValue(
                "worker_id", f"worker id {worker_id!r} is in use by pid {existing.pid} on {existing.hostname}"
            )
        BatchWorker.objects.update_or_create(
            pk=worker_id,
            defaults={
                "hostname": hostname,
                "pid": pid,
                "concurrency": concurrency,
                "heartbeat_at": now,
                "started_at": now,
                "stopped_at": None,
            },
        )


def unregister_worker(*, worker_id: str) -> None:
    """A worker that stops: its permits go back at once, its heartbeat record is closed."""
    with transaction.atomic():
        BatchPermit.objects.filter(worker_id=worker_id).delete()
        BatchWorker.objects.filter(pk=worker_id).update(stopped_at=db_now())
