"""Stops decided inside a worker's step (`execution.run_step`), under the batch row's lock that
the step's counter UPDATE took: the failure threshold, and retries written into a batch that is
being stopped. Same statements on PostgreSQL and SQLite."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from django.utils import timezone

from batch.models import AuditAction, BatchStatus, ItemStatus, StatusReason
from batch.services._base import STOPPABLE, audit, db_later_sql, db_uuid, notify, sql_marks

logger = logging.getLogger(__name__)


def cancel_retries(cursor: Any, batch_id: uuid.UUID, item_ids: Sequence[int]) -> int:
    """Retries in a batch being stopped: cancelled now. Its stop cancelled the unleased pending
    items before these were (the batch row's lock orders the two), so nobody else would."""
    return _cancel_unleased(cursor, batch_id, item_ids)


def _cancel_unleased(cursor: Any, batch_id: uuid.UUID, item_ids: Sequence[int] | None = None) -> int:
    """The batch's unleased pending items (those of `item_ids` only, if given) → cancelled, and
    counted; how many."""
    now, now_params = db_later_sql(0)
    batch = db_uuid(batch_id)
    among = "" if item_ids is None else f" AND id IN ({sql_marks(item_ids)})"
    cursor.execute(
        f"UPDATE batch_job_item SET status = %s, finished_at = {now}"
        f" WHERE batch_id = %s AND status = %s AND lease_owner = ''{among}",
        [ItemStatus.CANCELLED, *now_params, batch, ItemStatus.PENDING, *(item_ids or ())],
    )
    count = int(cursor.rowcount)
    cursor.execute("UPDATE batch_job SET cancelled_items = cancelled_items + %s WHERE id = %s", [count, batch])
    return count


def stop_at_failure_threshold(cursor: Any, batch_id: uuid.UUID) -> int | None:
    """The batch (its row locked by the counter update) has reached `max_failures`: stop it like
    a cancel (it ends `failed`). One conditional UPDATE holds the rule; the unleased pending items
    are cancelled at once, held ones by their workers. How many were cancelled; None if it did
    not apply (already stopping)."""
    now, now_params = db_later_sql(0)
    batch = db_uuid(batch_id)
    cursor.execute(
        f"UPDATE batch_job SET status = %s, status_reason = %s, cancel_requested_at = {now}"
        f" WHERE id = %s AND status IN ({sql_marks(STOPPABLE)}) AND max_failures IS NOT NULL"
        " AND failed_items >= max_failures RETURNING failed_items",
        [BatchStatus.CANCELLING, StatusReason.FAILURE_THRESHOLD, *now_params, batch, *STOPPABLE],
    )
    row = cursor.fetchone()
    if row is None:
        return None
    cancelled = _cancel_unleased(cursor, batch_id)
    reason = StatusReason.FAILURE_THRESHOLD
    audit(batch_id, AuditAction.CANCEL_REQUESTED, None, timezone.now(), reason=reason, pending_cancelled=cancelled)
    notify(batch_id, "cancel")
    logger.warning("batch stopped at its failure threshold", extra={"batch_id": str(batch_id), "failed": row[0]})
    return cancelled
