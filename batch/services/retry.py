"""Retry: a new batch that runs the failed (or also the cancelled) items of a finished one again.

The new batch keeps the handler, the owner, `max_parallel` and the stop rules; `retry_of` links
it back, and each item's `source_index` is its `index` in the original. Items are copied by one
INSERT … SELECT (same SQL on both databases), so a 100,000-item retry costs one statement.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from django.db import connection, transaction

from batch.models import TERMINAL_BATCH_STATUSES, AuditAction, BatchJob, ItemStatus
from batch.services._base import Actor, InvalidValue, audit, lock_batch, notify

logger = logging.getLogger(__name__)

RETRYABLE = (ItemStatus.FAILED, ItemStatus.CANCELLED)


class RetryOutcome(enum.Enum):
    CREATED = "created"
    REPLAYED = "replayed"  # the batch first created with this Idempotency-Key
    NOT_FINISHED = "not_finished"
    NOTHING_TO_RETRY = "nothing_to_retry"
    KEY_IN_USE = "key_in_use"  # the owner used the key for another batch
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class RetryResult:
    outcome: RetryOutcome
    batch: BatchJob | None  # the new (or replayed) batch; the original when refused


def retry_batch(
    *, batch_id: uuid.UUID, include: Sequence[str] = ("failed",), by: Actor = None, idempotency_key: str | None = None
) -> RetryResult:
    """Submit the original's items whose status is in `include` again, as a new batch.

    Raises InvalidValue for a bad `include`. Refused (nothing written) unless the original has
    finished and has such items.
    """
    statuses = _statuses(include)
    with transaction.atomic():
        try:
            original = lock_batch(batch_id)
        except BatchJob.DoesNotExist:
            return RetryResult(RetryOutcome.NOT_FOUND, None)
        if idempotency_key is not None:
            existing = BatchJob.objects.filter(
                created_by_id=original.created_by_id, idempotency_key=idempotency_key
            ).first()
            if existing is not None:
                replayed = existing.retry_of_id == original.pk
                return RetryResult(RetryOutcome.REPLAYED if replayed else RetryOutcome.KEY_IN_USE, existing)
        if original.status not in TERMINAL_BATCH_STATUSES:
            return RetryResult(RetryOutcome.NOT_FINISHED, original)
        count = sum(original.failed_items if s == ItemStatus.FAILED else original.cancelled_items for s in statuses)
        if count == 0:
            return RetryResult(RetryOutcome.NOTHING_TO_RETRY, original)
        batch = _copy(original, statuses, idempotency_key)
        audit(batch.pk, AuditAction.SUBMITTED, by, batch.created_at, items=count, retry_of=str(original.pk))
        audit(original.pk, AuditAction.RETRIED, by, batch.created_at, batch=str(batch.pk), include=statuses)
        notify(batch.pk, "submitted")
    logger.info("batch retried", extra={"batch_id": str(batch.pk), "retry_of": str(original.pk), "total": count})
    return RetryResult(RetryOutcome.CREATED, batch)


def _statuses(include: Sequence[str]) -> list[str]:
    if isinstance(include, str) or not include or any(s not in RETRYABLE for s in include):
        raise InvalidValue("include", 'A non-empty list of "failed" and "cancelled".')
    if len(set(include)) != len(include):
        raise InvalidValue("include", "Each status at most once.")
    return [str(s) for s in include]


def _copy(original: BatchJob, statuses: list[str], idempotency_key: str | None) -> BatchJob:
    batch = BatchJob.objects.create(
        handler=original.handler,
        name=original.name,
        max_parallel=original.max_parallel,
        max_attempts=original.max_attempts,
        max_failures=original.max_failures,
        deadline_seconds=original.deadline_seconds,
        created_by_id=original.created_by_id,
        idempotency_key=idempotency_key,
        retry_of=original,
    )
    marks = ", ".join(["%s"] * len(statuses))
    pk = BatchJob._meta.pk.get_db_prep_value
    with connection.cursor() as cursor:
        cursor.execute(
            'INSERT INTO batch_job_item (batch_id, "index", status, params, error, errors, attempts, lease_owner,'
            ' source_index) SELECT %s, ROW_NUMBER() OVER (ORDER BY "index") - 1, %s, params,'
            " '', '[]', 0, '', \"index\""
            f" FROM batch_job_item WHERE batch_id = %s AND status IN ({marks})",
            [pk(batch.pk, connection), ItemStatus.PENDING, pk(original.pk, connection), *statuses],
        )
        total = int(cursor.rowcount)
    batch.total_items = total
    batch.save(update_fields=["total_items", "updated_at"])
    return batch
