"""The worker's hot path: one step writes what a worker did on a batch and fetches what it holds next.

The step holds no cap rule: the cap is enforced by the slot permits (`permits.py`), and a worker
starts items only within them. A step, in one transaction and the same statements on PostgreSQL
and SQLite:

1. `started`: held items the worker started → running (lease-guarded; a retried step's starts
   that already applied are accepted again, so a lost reply leaves no phantom running item);
2. `outcomes`: items still running under the worker's lease → finished (a late result of an
   item the worker lost is discarded);
3. `give_back`: held items it no longer wants → unleased, or cancelled in a cancelling batch
   (only this part locks the batch row first: it serializes with a cancel);
4. the counters change by the deltas of 1 to 3 in one UPDATE of the batch row, which also moves
   the batch to running on its first start and to its terminal status after its last item;
5. `fetch`: up to that many unleased pending items, in index order, become held by the worker
   (`SKIP LOCKED`), if the batch still runs.

Lock order, as in every transaction here: the batch row before unleased items (a cancel's).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from batch.models import (
    TERMINAL_BATCH_STATUSES,
    AuditAction,
    BatchJob,
    BatchJobItem,
    BatchStatus,
    ItemStatus,
    StatusReason,
)
from batch.services._base import (
    STOPPABLE,
    ClaimedItem,
    Outcome,
    Start,
    Step,
    StepResult,
    audit,
    chunks,
    db_later_sql,
    finalize_if_done,
    lock_batch,
    notify,
    save_counters,
    stopped_status,
)
from batch.services.permits import PermitRequest, sync_permits

logger = logging.getLogger(__name__)

CHUNK_SIZE = 500  # rows per UPDATE … FROM (VALUES …)
ACTIVE = (BatchStatus.PENDING, BatchStatus.RUNNING)


def run_step(*, batch_id: uuid.UUID, worker_id: str, lease_seconds: float, step: Step) -> StepResult:
    """Write one step of `worker_id` on the batch (see the module docstring)."""
    now = timezone.now()
    with transaction.atomic():
        status = lock_batch(batch_id).status if step.give_back else None
        new_starts, accepted = _start(batch_id, worker_id, step.started, lease_seconds)
        done = _complete(worker_id, step.outcomes)
        cancelled = _give_back(batch_id, worker_id, step.give_back, cancel=status == BatchStatus.CANCELLING, now=now)
        if new_starts or done or cancelled:
            status = _apply_counters(batch_id, started=new_starts, finished=[s for _, s in done], cancelled=cancelled)
            changed = sorted({*accepted, *(i for i, _ in done)})
            notify(batch_id, "completed", changed, wake=status in TERMINAL_BATCH_STATUSES)
        # Last: a cancel locks the batch row and then waits for the unleased pending rows this
        # locks, so this step must already hold (or not need) the batch row by now.
        fetched = _fetch(batch_id, worker_id, step.fetch, lease_seconds) if step.fetch else []
    refused = sorted({s.item_id for s in step.started} - accepted)
    if refused:
        logger.warning(
            "starts refused: the items' leases were lost", extra={"batch_id": str(batch_id), "items": refused}
        )
    discarded = len({o.item_id for o in step.outcomes}) - len(done)
    if discarded:
        logger.warning("discarded late results", extra={"batch_id": str(batch_id), "discarded": discarded})
    return StepResult(fetched=fetched, status=status, refused=refused)


def _db_uuid(value: uuid.UUID) -> Any:
    return BatchJob._meta.pk.get_db_prep_value(value, connection)  # hex on SQLite


def _db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _cast(expression: str, sql_type: str) -> str:
    """PostgreSQL types the columns of a VALUES list as text; SQLite needs no cast."""
    return f"CAST({expression} AS {sql_type})" if connection.vendor == "postgresql" else expression


def _marks(values: Sequence[Any]) -> str:
    return ", ".join(["%s"] * len(values))


def _start(batch_id: uuid.UUID, worker_id: str, starts: Sequence[Start], lease_seconds: float) -> tuple[int, set[int]]:
    """Held items → running; (how many moved now, every start accepted)."""
    moved: set[int] = set()
    later, later_params = db_later_sql(lease_seconds)
    for chunk in chunks(starts, CHUNK_SIZE):
        params: list[Any] = []
        for start in chunk:
            params += [start.item_id, _db_time(start.started_at)]
        values = ", ".join(["(%s, %s)"] * len(chunk))
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE batch_job_item SET status = %s, attempts = attempts + 1,"
                f" started_at = {_cast('v.column2', 'timestamptz')}, lease_expires_at = {later}"
                f" FROM (VALUES {values}) AS v WHERE batch_job_item.id = v.column1"
                " AND batch_job_item.batch_id = %s AND batch_job_item.status = %s AND batch_job_item.lease_owner = %s"
                " RETURNING batch_job_item.id",
                [ItemStatus.RUNNING, *later_params, *params, _db_uuid(batch_id), ItemStatus.PENDING, worker_id],
            )
            moved.update(int(row[0]) for row in cursor.fetchall())
    rest = [s.item_id for s in starts if s.item_id not in moved]
    return len(moved), moved | _running_under(worker_id, rest)


def _running_under(worker_id: str, item_ids: Sequence[int]) -> set[int]:
    """Items among `item_ids` already running under `worker_id` (a retried step's starts)."""
    if not item_ids:
        return set()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM batch_job_item WHERE id IN ({_marks(item_ids)}) AND status = %s AND lease_owner = %s",
            [*item_ids, ItemStatus.RUNNING, worker_id],
        )
        return {int(row[0]) for row in cursor.fetchall()}


def _complete(worker_id: str, outcomes: Sequence[Outcome]) -> list[tuple[int, str]]:
    """Outcomes of items still running under `worker_id`'s lease → written; (id, status) of each."""
    by_id = {outcome.item_id: outcome for outcome in outcomes}
    written: list[tuple[int, str]] = []
    for chunk in chunks(by_id.values(), CHUNK_SIZE):
        params: list[Any] = []
        for o in chunk:
            result = None if o.result is None else json.dumps(o.result)
            params += [o.item_id, str(o.status), result, o.error, _db_time(o.finished_at)]
        values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(chunk))
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE batch_job_item SET status = v.column2, result = {_cast('v.column3', 'jsonb')},"
                f" error = v.column4, finished_at = {_cast('v.column5', 'timestamptz')},"
                " lease_owner = '', lease_expires_at = NULL"
                f" FROM (VALUES {values}) AS v WHERE batch_job_item.id = v.column1"
                " AND batch_job_item.status = %s AND batch_job_item.lease_owner = %s"
                " RETURNING batch_job_item.id, batch_job_item.status",
                [*params, ItemStatus.RUNNING, worker_id],
            )
            written += [(int(item_id), str(status)) for item_id, status in cursor.fetchall()]
    return written


def _give_back(batch_id: uuid.UUID, worker_id: str, item_ids: Sequence[int], *, cancel: bool, now: datetime) -> int:
    """Held items → unleased (cancelled if `cancel`); how many were cancelled."""
    status, finished = (ItemStatus.CANCELLED, _db_time(now)) if cancel else (ItemStatus.PENDING, None)
    count = 0
    for chunk in chunks(item_ids, CHUNK_SIZE):
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE batch_job_item SET status = %s, finished_at = %s, lease_owner = '', lease_expires_at = NULL"
                f" WHERE id IN ({_marks(chunk)}) AND batch_id = %s AND status = %s AND lease_owner = %s",
                [status, finished, *chunk, _db_uuid(batch_id), ItemStatus.PENDING, worker_id],
            )
            count += int(cursor.rowcount)
    return count if cancel else 0


def _fetch(batch_id: uuid.UUID, worker_id: str, limit: int, lease_seconds: float) -> list[ClaimedItem]:
    """Up to `limit` unleased pending items of a running batch → held by `worker_id`."""
    skip = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    later, later_params = db_later_sql(lease_seconds)
    batch = _db_uuid(batch_id)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE batch_job_item SET lease_owner = %s, lease_expires_at = {later} WHERE id IN ("
            "SELECT id FROM batch_job_item WHERE batch_id = %s AND status = %s AND lease_owner = ''"
            f' ORDER BY "index" LIMIT %s{skip})'
            " AND EXISTS (SELECT 1 FROM batch_job WHERE id = %s AND status IN (%s, %s))"
            ' RETURNING id, "index", params, attempts',
            [
                worker_id,
                *later_params,
                batch,
                ItemStatus.PENDING,
                limit,
                batch,
                BatchStatus.PENDING,
                BatchStatus.RUNNING,
            ],
        )
        rows = sorted(cursor.fetchall(), key=lambda row: row[1])
    # The attempt an item will be when it starts.
    return [
        ClaimedItem(id=i, index=x, params=json.loads(p) if isinstance(p, str) else p, attempt=a + 1)
        for i, x, p, a in rows
    ]


def _apply_counters(batch_id: uuid.UUID, *, started: int, finished: Sequence[str], cancelled: int) -> str:
    """Change the batch's counters by the step's deltas (the row lock is held only from here to
    the commit) and move its status on; the status after."""
    succeeded = sum(1 for s in finished if s == ItemStatus.SUCCEEDED)
    failed = sum(1 for s in finished if s == ItemStatus.FAILED)
    gone = len(finished) - succeeded - failed + cancelled
    now = _db_time(timezone.now())
    params: list[Any] = [started - len(finished), succeeded, failed, gone, BatchStatus.PENDING, started]
    params += [BatchStatus.RUNNING, started, now, now, _db_uuid(batch_id)]
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE batch_job SET running_items = running_items + %s, succeeded_items = succeeded_items + %s,"
            " failed_items = failed_items + %s, cancelled_items = cancelled_items + %s,"
            " status = CASE WHEN status = %s AND %s > 0 THEN %s ELSE status END,"
            " started_at = CASE WHEN started_at IS NULL AND %s > 0 THEN %s ELSE started_at END, updated_at = %s"
            " WHERE id = %s"
            " RETURNING status, total_items, running_items, succeeded_items, failed_items, cancelled_items,"
            " CASE WHEN started_at = %s THEN 1 ELSE 0 END, max_failures, status_reason",
            [*params, now],
        )
        row = cursor.fetchone()
        if row is None:
            return BatchStatus.CANCELLED  # deleted meanwhile
        status, total, running, ok, bad, cancelled_now, began, max_failures, reason = row
        if began and started:
            logger.info("batch started", extra={"batch_id": str(batch_id)})
        if max_failures is not None and bad >= max_failures and status in STOPPABLE:
            stopped = _stop_at_failure_threshold(cursor, batch_id)
            if stopped is not None:
                status, reason, cancelled_now = (
                    BatchStatus.CANCELLING,
                    StatusReason.FAILURE_THRESHOLD,
                    cancelled_now + stopped,
                )
        if running or total != ok + bad + cancelled_now or status in TERMINAL_BATCH_STATUSES:
            return str(status)
        final = stopped_status(reason) if status == BatchStatus.CANCELLING else BatchStatus.FAILED
        if status != BatchStatus.CANCELLING and not bad and not cancelled_now:
            final = BatchStatus.SUCCEEDED
        cursor.execute(
            "UPDATE batch_job SET status = %s, finished_at = %s WHERE id = %s", [final, now, _db_uuid(batch_id)]
        )
    logger.info("batch finished", extra={"batch_id": str(batch_id), "status": final, "total": total})
    return str(final)


def _stop_at_failure_threshold(cursor: Any, batch_id: uuid.UUID) -> int | None:
    """The batch (its row locked by the counter update) has reached `max_failures`: stop it like
    a cancel (it ends `failed`). One conditional UPDATE holds the rule; the unleased pending items
    are cancelled at once, held ones by their workers. How many were cancelled; None if it did
    not apply (already stopping)."""
    now, now_params = db_later_sql(0)
    batch = _db_uuid(batch_id)
    cursor.execute(
        f"UPDATE batch_job SET status = %s, status_reason = %s, cancel_requested_at = {now}"
        f" WHERE id = %s AND status IN ({_marks(STOPPABLE)}) AND max_failures IS NOT NULL"
        " AND failed_items >= max_failures RETURNING failed_items",
        [BatchStatus.CANCELLING, StatusReason.FAILURE_THRESHOLD, *now_params, batch, *STOPPABLE],
    )
    row = cursor.fetchone()
    if row is None:
        return None
    cursor.execute(
        f"UPDATE batch_job_item SET status = %s, finished_at = {now}"
        " WHERE batch_id = %s AND status = %s AND lease_owner = ''",
        [ItemStatus.CANCELLED, *now_params, batch, ItemStatus.PENDING],
    )
    cancelled = int(cursor.rowcount)
    cursor.execute("UPDATE batch_job SET cancelled_items = cancelled_items + %s WHERE id = %s", [cancelled, batch])
    reason = StatusReason.FAILURE_THRESHOLD
    audit(batch_id, AuditAction.CANCEL_REQUESTED, None, timezone.now(), reason=reason, pending_cancelled=cancelled)
    notify(batch_id, "cancel")
    logger.warning("batch stopped at its failure threshold", extra={"batch_id": str(batch_id), "failed": row[0]})
    return cancelled


# --- conveniences (scripts, tests) and shutdown ---------------------------------------------


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
