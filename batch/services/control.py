"""Operator requests on a running batch: cancel (with its force deadline), resize; deadlines."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import BooleanField
from django.db.models.expressions import RawSQL
from django.utils import timezone

from batch.models import (
    AuditAction,
    BatchJob,
    BatchJobItem,
    BatchStatus,
    ItemStatus,
    StatusReason,
)
from batch.services._base import (
    COUNTER_FIELDS,
    MAX_PARALLEL_LIMIT,
    STOPPABLE,
    Actor,
    CancelOutcome,
    CancelResult,
    InvalidValue,
    as_user,
    audit,
    db_deadline_passed_sql,
    db_now,
    finalize_if_done,
    lock_batch,
    notify,
)

logger = logging.getLogger(__name__)


def request_cancel(
    *, batch_id: uuid.UUID, by: Actor = None, reason: StatusReason = StatusReason.REQUESTED
) -> CancelResult:
    """Start cancelling: the batch → cancelling, its unleased pending items → cancelled at once.

    Workers see the request (notification, else their poll) and stop the running items
    cooperatively; the last one to stop moves the batch to cancelled. `reason` becomes the
    batch's `status_reason` (a user's request, or its deadline).
    """
    with transaction.atomic():
        try:
            batch = lock_batch(batch_id)
        except BatchJob.DoesNotExist:
            return CancelResult(CancelOutcome.NOT_FOUND, None)
        if batch.is_terminal:
            return CancelResult(CancelOutcome.TERMINAL, batch)
        if batch.status == BatchStatus.CANCELLING:
            return CancelResult(CancelOutcome.ALREADY_CANCELLING, batch)
        now = db_now()  # the force deadline counts from here, by the database's clock
        # Items held by a worker stay: it may have started one without writing it yet. It
        # gives them back, cancelled, when it sees
        # the cancel; if it died, lease recovery does.
        cancelled = BatchJobItem.objects.filter(batch_id=batch_id, status=ItemStatus.PENDING, lease_owner="").update(
            status=ItemStatus.CANCELLED, finished_at=now
        )
        details = {"status": batch.status, "pending_cancelled": cancelled, "reason": str(reason)}
        audit(batch_id, AuditAction.CANCEL_REQUESTED, by, now, **details)
        batch.cancelled_items += cancelled
        batch.status = BatchStatus.CANCELLING
        batch.status_reason = reason
        batch.cancel_requested_at = now
        batch.cancel_requested_by = as_user(by)
        finalize_if_done(batch, now)
        batch.save(update_fields=[*COUNTER_FIELDS, "cancel_requested_at", "cancel_requested_by", "status_reason"])
        notify(batch_id, "cancel")
    logger.info("batch cancel requested", extra={"batch_id": str(batch_id), "status": batch.status})
    return CancelResult(CancelOutcome.REQUESTED, batch)


def enforce_deadlines() -> int:
    """Cancel every unfinished batch whose `deadline_seconds` since it started have passed (by
    the database's clock), reason `deadline`; also batches no worker runs. How many."""
    overdue = (
        BatchJob.objects.filter(status__in=STOPPABLE)
        .alias(overdue=RawSQL(db_deadline_passed_sql(), [], output_field=BooleanField()))
        .filter(overdue=True)
        .values_list("pk", flat=True)
    )
    results = [request_cancel(batch_id=pk, reason=StatusReason.DEADLINE) for pk in list(overdue[:100])]
    return sum(result.outcome is CancelOutcome.REQUESTED for result in results)


def cancel_deadline(batch: BatchJob) -> datetime | None:
    """When items that ignore cancellation are cancelled by force."""
    if batch.cancel_requested_at is None:
        return None
    return batch.cancel_requested_at + timedelta(seconds=settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS)


def resize_batch(*, batch_id: uuid.UUID, max_parallel: int, by: Actor = None) -> BatchJob | None:
    """Change `max_parallel` of a batch that has not finished; None if it is terminal.

    Raises BatchJob.DoesNotExist for an unknown id and InvalidValue for a bad value.
    """
    if not 1 <= max_parallel <= MAX_PARALLEL_LIMIT:
        raise InvalidValue("max_parallel", f"Must be between 1 and {MAX_PARALLEL_LIMIT}.")
    with transaction.atomic():
        batch = lock_batch(batch_id)
        if batch.is_terminal:
            return None
        audit(batch_id, AuditAction.RESIZED, by, timezone.now(), old=batch.max_parallel, new=max_parallel)
        batch.max_parallel = max_parallel
        batch.save(update_fields=["max_parallel", "updated_at"])
        notify(batch_id, "resize")
    logger.info("batch resized", extra={"batch_id": str(batch_id), "max_parallel": max_parallel})
    return batch
