"""The worker's hot path: complete finished items and claim the next ones, within the cap; release on shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from batch.models import (
    TERMINAL_BATCH_STATUSES,
    BatchJob,
    BatchJobItem,
    BatchStatus,
    ItemStatus,
)
from batch.services._base import (
    CONTROL_CHANNEL,
    Claim,
    ClaimedItem,
    Outcome,
    apply_finished,
    chunks,
    finalize_if_done,
    lock_batch,
    notify,
    save_counters,
)

logger = logging.getLogger(__name__)


COMPLETE_CHUNK_SIZE = 500  # rows per UPDATE … FROM (VALUES …): 5 parameters each


def _db_uuid(value: uuid.UUID) -> Any:
    return BatchJob._meta.pk.get_db_prep_value(value, connection)  # hex on SQLite


def _db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


@contextlib.contextmanager
def _hot_cursor() -> Iterator[Any]:
    """On PostgreSQL a psycopg cursor with server-side binding on Django's connection (same
    transaction; Django's own is a client-binding cursor): no quoting in Python, statements
    can be prepared. Errors still become Django's (the worker retries OperationalError)."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            yield cursor
        return
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


def _lock_counters(batch_id: uuid.UUID) -> BatchJob | None:
    """Status and counters of the batch (an unsaved partial instance), its row locked."""
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with _hot_cursor() as cursor:
        cursor.execute(
            "SELECT status, max_parallel, total_items, running_items, succeeded_items, failed_items,"
            f" cancelled_items FROM batch_job WHERE id = %s{lock}",
            [_db_uuid(batch_id)],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    status, max_parallel, total, running, succeeded, failed, cancelled = row
    return BatchJob(
        id=batch_id,
        status=status,
        max_parallel=max_parallel,
        total_items=total,
        running_items=running,
        succeeded_items=succeeded,
        failed_items=failed,
        cancelled_items=cancelled,
    )


def _write_counters(batch: BatchJob, *, now: datetime, started: bool) -> None:
    sets = "status = %s, running_items = %s, succeeded_items = %s, failed_items = %s, cancelled_items = %s"
    params: list[Any] = [batch.status, batch.running_items, batch.succeeded_items, batch.failed_items]
    params.append(batch.cancelled_items)
    sets += ", updated_at = %s"
    params.append(_db_time(now))
    if started:
        sets += ", started_at = %s"
        params.append(_db_time(now))
    if batch.finished_at is not None:
        sets += ", finished_at = %s"
        params.append(_db_time(batch.finished_at))
    with _hot_cursor() as cursor:
        cursor.execute(f"UPDATE batch_job SET {sets} WHERE id = %s", [*params, _db_uuid(batch.id)])


def _claim_locked(
    batch: BatchJob, *, worker_id: str, limit: int, lease_seconds: float, now: datetime
) -> list[ClaimedItem]:
    """Move up to `limit` pending items of the locked batch to running, within its cap."""
    if batch.status not in (BatchStatus.PENDING, BatchStatus.RUNNING):
        return []
    wanted = min(limit, batch.effective_parallel - batch.running_items, batch.pending_items)
    if wanted <= 0:
        return []
    skip = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    lease = _db_time(now + timedelta(seconds=lease_seconds))
    with _hot_cursor() as cursor:
        cursor.execute(
            "UPDATE batch_job_item SET status = %s, lease_owner = %s, lease_expires_at = %s,"
            " attempts = attempts + 1, started_at = %s, finished_at = NULL WHERE id IN"
            ' (SELECT id FROM batch_job_item WHERE batch_id = %s AND status = %s ORDER BY "index" LIMIT %s'
            f'{skip}) RETURNING id, "index", params, attempts',
            [ItemStatus.RUNNING, worker_id, lease, _db_time(now), _db_uuid(batch.id), ItemStatus.PENDING, wanted],
        )
        rows = sorted(cursor.fetchall(), key=lambda row: row[1])
    batch.running_items += len(rows)
    return [
        ClaimedItem(id=i, index=x, params=json.loads(p) if isinstance(p, str) else p, attempt=a) for i, x, p, a in rows
    ]


def _complete_locked(batch: BatchJob, *, worker_id: str, outcomes: Sequence[Outcome]) -> list[int]:
    """Write the outcomes of items still running under `worker_id`'s lease; their ids."""
    by_id = {outcome.item_id: outcome for outcome in outcomes}
    written: list[tuple[int, str]] = []
    for chunk in chunks(by_id.values(), COMPLETE_CHUNK_SIZE):
        written += _complete_chunk(worker_id, chunk)
    apply_finished(batch, [status for _, status in written])
    return [item_id for item_id, _ in written]


def _complete_chunk(worker_id: str, outcomes: list[Outcome]) -> list[tuple[int, str]]:
    params: list[Any] = []
    for o in outcomes:
        result = None if o.result is None else json.dumps(o.result)
        params += [o.item_id, str(o.status), result, o.error, _db_time(o.finished_at)]
    result, finished = ("v.column3", "v.column5")
    if connection.vendor == "postgresql":
        result, finished = "CAST(v.column3 AS jsonb)", "CAST(v.column5 AS timestamptz)"
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(outcomes))
    with _hot_cursor() as cursor:
        cursor.execute(
            f"UPDATE batch_job_item SET status = v.column2, result = {result}, error = v.column4,"
            f" finished_at = {finished}, lease_owner = '', lease_expires_at = NULL FROM (VALUES {values}) AS v"
            " WHERE batch_job_item.id = v.column1 AND batch_job_item.status = %s AND batch_job_item.lease_owner = %s"
            " RETURNING id, status",
            [*params, ItemStatus.RUNNING, worker_id],
        )
        return [(int(item_id), str(status)) for item_id, status in cursor.fetchall()]


def complete_and_claim(
    *, batch_id: uuid.UUID, worker_id: str, outcomes: Sequence[Outcome], claim_limit: int, lease_seconds: float
) -> Claim:
    """Record finished items, then claim up to `claim_limit` more: one transaction, one lock.

    Completing first frees the cap the claim takes from. Only items still running under
    `worker_id`'s lease are written: a late result (force-cancelled, or taken over after its
    lease expired) is discarded. The pending → running move is also the item's start.
    """
    step = _step_postgres if connection.vendor == "postgresql" else _step_locked
    claim, done, was = step(
        batch_id=batch_id, worker_id=worker_id, outcomes=outcomes, claim_limit=claim_limit, lease_seconds=lease_seconds
    )
    if was == BatchStatus.PENDING and claim.status == BatchStatus.RUNNING:
        logger.info("batch started", extra={"batch_id": str(batch_id), "worker_id": worker_id})
    if done or claim.items or claim.status != was:
        notify(batch_id, "completed", [*done, *(i.id for i in claim.items)], wake=False)
    discarded = len({o.item_id for o in outcomes}) - len(done)
    if discarded:
        logger.warning("discarded late results", extra={"batch_id": str(batch_id), "discarded": discarded})
    return claim


def _step_locked(
    *, batch_id: uuid.UUID, worker_id: str, outcomes: Sequence[Outcome], claim_limit: int, lease_seconds: float
) -> tuple[Claim, list[int], str]:
    """The step as a few statements after locking the batch row (SQLite; the reference)."""
    with transaction.atomic():
        batch = _lock_counters(batch_id)
        if batch is None:
            return Claim(items=[], pending=0, status=BatchStatus.CANCELLED), [], BatchStatus.CANCELLED
        was, now = batch.status, timezone.now()
        done = _complete_locked(batch, worker_id=worker_id, outcomes=outcomes)
        finalize_if_done(batch, now)
        items = _claim_locked(batch, worker_id=worker_id, limit=claim_limit, lease_seconds=lease_seconds, now=now)
        if items and batch.status == BatchStatus.PENDING:
            batch.status = BatchStatus.RUNNING
        if done or items or batch.status != was:
            _write_counters(batch, now=now, started=was == BatchStatus.PENDING and batch.status != was)
    return Claim(items=items, pending=batch.pending_items, status=batch.status), done, was


# PostgreSQL does the whole step in one statement (one round trip, no BEGIN/COMMIT): lock the
# batch row, write the completions (lease-guarded), claim within the cap the completions
# freed, update the counters and finalize. `b` is locked before any item is touched: `done`
# joins it and the claim's LIMIT reads it. A claimer that waited for the lock reads the row
# as committed by the other (FOR UPDATE returns the latest version); items the other claimed
# fail the re-checked `status = 'pending'` and are skipped. Mirrors the multi-statement path.
_STEP_SQL = """
WITH b AS (
    SELECT id, status, LEAST(max_parallel, %(cap)s) AS cap, total_items, running_items,
           succeeded_items, failed_items, cancelled_items
    FROM batch_job WHERE id = %(batch)s FOR UPDATE
), v AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(results)s::jsonb[],
                         %(errors)s::text[], %(finished)s::timestamptz[])
        AS v (id, status, result, error, finished_at)
), done AS (
    UPDATE batch_job_item i SET status = v.status, result = v.result, error = v.error,
        finished_at = v.finished_at, lease_owner = '', lease_expires_at = NULL
    FROM v, b
    WHERE i.id = v.id AND i.batch_id = b.id AND i.status = 'running' AND i.lease_owner = %(worker)s
    RETURNING i.id, i.status
), counts AS (
    SELECT count(*) AS n, count(*) FILTER (WHERE status = 'succeeded') AS ok,
           count(*) FILTER (WHERE status = 'failed') AS bad, count(*) FILTER (WHERE status = 'cancelled') AS gone
    FROM done
), want AS (
    SELECT GREATEST(0, LEAST(%(limit)s, b.cap - b.running_items + counts.n, b.total_items - b.running_items
                    - b.succeeded_items - b.failed_items - b.cancelled_items)) AS n
    FROM b, counts WHERE b.status IN ('pending', 'running')
), claimed AS (
    UPDATE batch_job_item SET status = 'running', lease_owner = %(worker)s, lease_expires_at = %(lease)s,
        attempts = attempts + 1, started_at = %(now)s, finished_at = NULL
    WHERE id IN (
        SELECT id FROM batch_job_item WHERE batch_id = %(batch)s AND status = 'pending'
        ORDER BY "index" LIMIT (SELECT coalesce(max(n), 0) FROM want) FOR UPDATE SKIP LOCKED
    )
    RETURNING id, "index", params, attempts
), nxt AS (
    SELECT b.id, b.status AS was, b.total_items AS total,
           b.running_items - counts.n + (SELECT count(*) FROM claimed) AS running,
           b.succeeded_items + counts.ok AS succeeded, b.failed_items + counts.bad AS failed,
           b.cancelled_items + counts.gone AS cancelled
    FROM b, counts
), x AS (
    SELECT nxt.*, CASE
        WHEN was IN ('succeeded', 'failed', 'cancelled') THEN was
        WHEN running = 0 AND total = succeeded + failed + cancelled THEN CASE
            WHEN was = 'cancelling' THEN 'cancelled' WHEN failed + cancelled > 0 THEN 'failed' ELSE 'succeeded' END
        WHEN was = 'pending' AND running > 0 THEN 'running'
        ELSE was END AS status
    FROM nxt
), upd AS (
    UPDATE batch_job j SET status = x.status, running_items = x.running, succeeded_items = x.succeeded,
        failed_items = x.failed, cancelled_items = x.cancelled, updated_at = %(now)s,
        started_at = CASE WHEN x.was = 'pending' AND x.status <> 'pending' THEN %(now)s ELSE j.started_at END,
        finished_at = CASE WHEN x.status <> x.was AND x.status IN ('succeeded', 'failed', 'cancelled')
                      THEN %(now)s ELSE j.finished_at END
    FROM x WHERE j.id = x.id
    RETURNING x.status, x.was, x.total - x.running - x.succeeded - x.failed - x.cancelled AS pending, x.total
)
SELECT upd.status, upd.was, upd.pending, upd.total, (SELECT coalesce(array_agg(id), '{}') FROM done) AS done_ids,
       CASE WHEN upd.status <> upd.was AND upd.status IN ('succeeded', 'failed', 'cancelled')
            THEN pg_notify(%(channel)s, 'finished:' || %(batch)s::text) END AS notified,
       c.id, c."index", c.params, c.attempts
FROM upd LEFT JOIN claimed c ON true
"""


def _step_postgres(
    *, batch_id: uuid.UUID, worker_id: str, outcomes: Sequence[Outcome], claim_limit: int, lease_seconds: float
) -> tuple[Claim, list[int], str]:
    """The step as one statement; (claim, ids of the items written, status before)."""
    by_id = {outcome.item_id: outcome for outcome in outcomes}
    now = timezone.now()
    params = {
        "batch": batch_id,
        "cap": settings.BATCH_GLOBAL_MAX_PARALLEL,
        "worker": worker_id,
        "limit": claim_limit,
        "lease": now + timedelta(seconds=lease_seconds),
        "now": now,
        "channel": CONTROL_CHANNEL,
        "ids": list(by_id),
        "statuses": [str(o.status) for o in by_id.values()],
        "results": [None if o.result is None else json.dumps(o.result) for o in by_id.values()],
        "errors": [o.error for o in by_id.values()],
        "finished": [o.finished_at for o in by_id.values()],
    }
    with _hot_cursor() as cursor:
        cursor.execute(_STEP_SQL, params, prepare=True)  # planned once per connection
        rows = cursor.fetchall()
    if not rows:
        return Claim(items=[], pending=0, status=BatchStatus.CANCELLED), [], BatchStatus.CANCELLED
    status, was, pending, total, done, *_ = rows[0]
    if status != was and status in TERMINAL_BATCH_STATUSES:
        logger.info("batch finished", extra={"batch_id": str(batch_id), "status": status, "total": total})
    items = sorted(
        (
            ClaimedItem(id=r[6], index=r[7], params=json.loads(r[8]) if isinstance(r[8], str) else r[8], attempt=r[9])
            for r in rows
            if r[6] is not None
        ),
        key=lambda item: item.index,
    )
    return Claim(items=items, pending=pending, status=status), list(done), was


def claim_items(*, batch_id: uuid.UUID, worker_id: str, limit: int, lease_seconds: float) -> Claim:
    """Mark up to `limit` pending items running for `worker_id`, within the batch's cap.

    The cap counts the running items of every worker: the locked batch row is the
    cluster-wide semaphore.
    """
    return complete_and_claim(
        batch_id=batch_id, worker_id=worker_id, outcomes=(), claim_limit=limit, lease_seconds=lease_seconds
    )


def complete_items(*, batch_id: uuid.UUID, worker_id: str, outcomes: Sequence[Outcome]) -> BatchJob:
    """Record finished items (succeeded, failed or cancelled) and finalize the batch if done.

    Raises BatchJob.DoesNotExist for an unknown batch.
    """
    complete_and_claim(batch_id=batch_id, worker_id=worker_id, outcomes=outcomes, claim_limit=0, lease_seconds=0)
    return BatchJob.objects.get(pk=batch_id)


def release_items(*, batch_id: uuid.UUID, worker_id: str, item_ids: Sequence[int]) -> int:
    """Give running items back (graceful shutdown): pending again, the attempt not counted.

    In a cancelling batch they become cancelled instead. Returns how many were released.
    """
    with transaction.atomic():
        batch = lock_batch(batch_id)
        items = BatchJobItem.objects.filter(pk__in=list(item_ids), status=ItemStatus.RUNNING, lease_owner=worker_id)
        now = timezone.now()
        if batch.status == BatchStatus.CANCELLING:
            released = items.update(
                status=ItemStatus.CANCELLED,
                finished_at=now,
                lease_owner="",
                lease_expires_at=None,
                error="Cancelled while its worker shut down.",
            )
            batch.cancelled_items += released
        else:
            released = items.update(
                status=ItemStatus.PENDING,
                attempts=F("attempts") - 1,
                started_at=None,
                lease_owner="",
                lease_expires_at=None,
            )
        batch.running_items -= released
        finalize_if_done(batch, now)
        save_counters(batch)
        notify(batch_id, "released", list(item_ids))
    return released
