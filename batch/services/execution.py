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
from psycopg.types.numeric import Int8BinaryDumper

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
    Handover,
    Outcome,
    Step,
    apply_finished,
    chunks,
    finalize_if_done,
    lock_batch,
    notify,
    save_counters,
)

logger = logging.getLogger(__name__)


# A worker whose claim finds the cap taken sets the batch's worker share for this long; its
# next refused claims (it retries on every wake-up and poll) extend it.
SHARE_SECONDS = 2.0
NEVER_AUTOMATICALLY = 2**31  # psycopg's prepare_threshold: executions before it prepares unasked
COMPLETE_CHUNK_SIZE = 500  # rows per UPDATE … FROM (VALUES …): 5 parameters each


def _db_uuid(value: uuid.UUID) -> Any:
    return BatchJob._meta.pk.get_db_prep_value(value, connection)  # hex on SQLite


def _db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _from_db_time(value: Any) -> datetime | None:
    """A timestamp read by a raw cursor: aware already on PostgreSQL, naive UTC on SQLite."""
    if value is None or (isinstance(value, datetime) and value.tzinfo is not None):
        return value
    converted: datetime = connection.ops.convert_datetimefield_value(value, None, connection)  # type: ignore[attr-defined]
    return converted


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
    raw = connection.connection
    if raw.prepare_threshold is None and settings.DATABASE_PREPARED_STATEMENTS:
        # Django turns psycopg's prepared statements off (for transaction-mode poolers); then
        # even `execute(prepare=True)` does not prepare. Allow explicit preparation only.
        raw.prepare_threshold = NEVER_AUTOMATICALLY
        # Every int as int8 in binary parameters: one prepared statement per query, not one
        # per combination of small and large values.
        raw.adapters.register_dumper(int, Int8BinaryDumper)
    with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        yield cursor


def _lock_counters(batch_id: uuid.UUID) -> BatchJob | None:
    """Status and counters of the batch (an unsaved partial instance), its row locked."""
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with _hot_cursor() as cursor:
        cursor.execute(
            "SELECT status, max_parallel, total_items, running_items, succeeded_items, failed_items,"
            f" cancelled_items, worker_share, worker_share_until, worker_share_for FROM batch_job WHERE id = %s{lock}",
            [_db_uuid(batch_id)],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    status, max_parallel, total, running, succeeded, failed, cancelled, share, share_until, share_for = row
    return BatchJob(
        id=batch_id,
        status=status,
        max_parallel=max_parallel,
        total_items=total,
        running_items=running,
        succeeded_items=succeeded,
        failed_items=failed,
        cancelled_items=cancelled,
        worker_share=share,
        worker_share_until=_from_db_time(share_until),
        worker_share_for=share_for,
    )


def _share_refused_cap(batch: BatchJob, *, worker_id: str, now: datetime) -> None:
    """A claim of `worker_id` found the locked batch's cap taken while items wait: divide the
    cap among the workers running its items and this one (`BatchJob.worker_share`)."""
    owners = set(
        BatchJobItem.objects.filter(batch_id=batch.id, status=ItemStatus.RUNNING).values_list("lease_owner", flat=True)
    )
    batch.worker_share = max(1, batch.effective_parallel // len(owners | {worker_id}))
    batch.worker_share_until = now + timedelta(seconds=SHARE_SECONDS)
    batch.worker_share_for = worker_id
    BatchJob.objects.filter(pk=batch.id).update(
        worker_share=batch.worker_share,
        worker_share_until=batch.worker_share_until,
        worker_share_for=worker_id,
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


def _start_reserved(batch: BatchJob, *, worker_id: str, started: Sequence[Handover], lease: datetime) -> list[int]:
    """Reserved items the worker started in place of finished ones → running; their ids."""
    if not started:
        return []
    params: list[Any] = []
    for handover in started:
        params += [handover.item_id, _db_time(handover.started_at)]
    values = ", ".join(["(%s, %s)"] * len(started))
    with _hot_cursor() as cursor:
        cursor.execute(
            "UPDATE batch_job_item SET status = %s, attempts = attempts + 1, started_at = v.column2,"
            f" lease_expires_at = %s FROM (VALUES {values}) AS v WHERE batch_job_item.id = v.column1"
            " AND batch_job_item.batch_id = %s AND batch_job_item.status = %s AND batch_job_item.lease_owner = %s"
            " RETURNING id",
            [ItemStatus.RUNNING, _db_time(lease), *params, _db_uuid(batch.id), ItemStatus.PENDING, worker_id],
        )
        accepted = [int(row[0]) for row in cursor.fetchall()]
    batch.running_items += len(accepted)
    return accepted


def _give_back_locked(batch: BatchJob, *, worker_id: str, item_ids: Sequence[int], now: datetime) -> int:
    """Unreserve `worker_id`'s reservations among `item_ids`; cancel them in a cancelling batch."""
    if not item_ids:
        return 0
    marks = ", ".join(["%s"] * len(item_ids))
    cancel = batch.status == BatchStatus.CANCELLING
    status, finished = (ItemStatus.CANCELLED, _db_time(now)) if cancel else (ItemStatus.PENDING, None)
    with _hot_cursor() as cursor:
        cursor.execute(
            "UPDATE batch_job_item SET status = %s, finished_at = %s, lease_owner = '', lease_expires_at = NULL"
            f" WHERE id IN ({marks}) AND batch_id = %s AND status = %s AND lease_owner = %s",
            [status, finished, *item_ids, _db_uuid(batch.id), ItemStatus.PENDING, worker_id],
        )
        count = int(cursor.rowcount)
    if cancel:
        batch.cancelled_items += count
    return count


def _running_under(worker_id: str, item_ids: Sequence[int]) -> set[int]:
    if not item_ids:
        return set()
    marks = ", ".join(["%s"] * len(item_ids))
    with _hot_cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM batch_job_item WHERE id IN ({marks}) AND status = %s AND lease_owner = %s",
            [*item_ids, ItemStatus.RUNNING, worker_id],
        )
        return {int(row[0]) for row in cursor.fetchall()}


def _claim_locked(
    batch: BatchJob, *, worker_id: str, limit: int, promote: Sequence[int], lease: datetime, now: datetime
) -> list[ClaimedItem]:
    """Move up to `limit` pending items of the locked batch to running, within its cap: the
    worker's own reserved items in `promote` first, then unreserved ones in index order."""
    if batch.status not in (BatchStatus.PENDING, BatchStatus.RUNNING):
        return []
    wanted = min(limit, batch.effective_parallel - batch.running_items, batch.pending_items)
    if wanted <= 0:
        return []
    rows = []
    if promote:
        marks = ", ".join(["%s"] * len(promote))
        rows = _move_pending(
            f"id IN ({marks}) AND batch_id = %s AND status = %s AND lease_owner = %s ORDER BY id LIMIT %s",
            [*promote, _db_uuid(batch.id), ItemStatus.PENDING, worker_id, wanted],
            worker_id=worker_id,
            lease=lease,
            now=now,
        )
    if len(rows) < wanted:
        rows += _move_pending(
            "batch_id = %s AND status = %s AND lease_owner = '' ORDER BY \"index\" LIMIT %s",
            [_db_uuid(batch.id), ItemStatus.PENDING, wanted - len(rows)],
            worker_id=worker_id,
            lease=lease,
            now=now,
        )
    batch.running_items += len(rows)
    return _claimed_items(sorted(rows, key=lambda row: row[1]))


def _move_pending(where: str, params: list[Any], *, worker_id: str, lease: datetime, now: datetime | None) -> list[Any]:
    """Lease the pending items `where` selects to `worker_id`: running from `now`, or, with
    `now` None, reserved (still pending). Rows of (id, index, params, attempts after)."""
    skip = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    status, started, attempts = (ItemStatus.PENDING, None, "attempts")
    if now is not None:
        status, started, attempts = (ItemStatus.RUNNING, _db_time(now), "attempts + 1")
    with _hot_cursor() as cursor:
        cursor.execute(
            f"UPDATE batch_job_item SET status = %s, lease_owner = %s, lease_expires_at = %s, attempts = {attempts},"
            f" started_at = %s, finished_at = NULL WHERE id IN (SELECT id FROM batch_job_item WHERE {where}{skip})"
            ' RETURNING id, "index", params, attempts',
            [status, worker_id, _db_time(lease), started, *params],
        )
        return list(cursor.fetchall())


def _reserve_locked(batch: BatchJob, *, worker_id: str, limit: int, lease: datetime) -> list[ClaimedItem]:
    """Reserve up to `limit` more unreserved pending items of the locked batch for `worker_id`."""
    if limit <= 0 or batch.status not in (BatchStatus.PENDING, BatchStatus.RUNNING):
        return []
    rows = _move_pending(
        "batch_id = %s AND status = %s AND lease_owner = '' ORDER BY \"index\" LIMIT %s",
        [_db_uuid(batch.id), ItemStatus.PENDING, limit],
        worker_id=worker_id,
        lease=lease,
        now=None,
    )
    # A reserved item's attempt counts when it starts.
    return _claimed_items(sorted(((i, x, p, a + 1) for i, x, p, a in rows), key=lambda row: row[1]))


def _claimed_items(rows: Sequence[Any]) -> list[ClaimedItem]:
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
    *,
    batch_id: uuid.UUID,
    worker_id: str,
    outcomes: Sequence[Outcome],
    claim_limit: int,
    lease_seconds: float,
    started: Sequence[Handover] = (),
    promote: Sequence[int] = (),
    reserve_limit: int = 0,
    reserve_per_claim: int = 0,
    give_back: Sequence[int] = (),
) -> Claim:
    """`run_step` with the step's parts as keywords."""
    step = Step(
        outcomes=list(outcomes),
        started=list(started),
        claim=claim_limit,
        promote=list(promote),
        reserve=reserve_limit,
        reserve_per_claim=reserve_per_claim,
        give_back=list(give_back),
    )
    return run_step(batch_id=batch_id, worker_id=worker_id, lease_seconds=lease_seconds, step=step)


def run_step(*, batch_id: uuid.UUID, worker_id: str, lease_seconds: float, step: Step) -> Claim:
    """One step of a worker on a batch, in one transaction under the batch-row lock:

    1. `step.started`: reserved items the worker started in place of finished ones → running
       (a handover: the finished item still counted against the cap until now);
    2. `step.outcomes`: record finished items (a handed-over item may finish in the same step);
    3. claim up to `step.claim` items to start now, within the cap the completions freed: the
       worker's reserved items in `step.promote` first, then unreserved ones;
    4. reserve up to `step.reserve` more pending items for later handovers, plus
       `step.reserve_per_claim` for each item the claim starts (none when the cap is full);
    5. `step.give_back`: reservations the worker no longer wants — unreserved, or cancelled in
       a cancelling batch (a cancel leaves reserved items to their worker).

    Only items under `worker_id`'s lease are written: a late result (force-cancelled, or
    taken over after its lease expired) is discarded, and so is a handover of a reservation
    that was lost (`Claim.refused`). The pending → running move is the item's start.
    """
    write = _step_postgres if connection.vendor == "postgresql" else _step_locked
    claim, done, was = write(batch_id, worker_id, lease_seconds, step)
    if was == BatchStatus.PENDING and claim.status == BatchStatus.RUNNING:
        logger.info("batch started", extra={"batch_id": str(batch_id), "worker_id": worker_id})
    if done or claim.items or claim.status != was or len(claim.refused) < len(step.started):
        changed = {*done, *(i.id for i in claim.items), *(h.item_id for h in step.started)} - set(claim.refused)
        notify(batch_id, "completed", sorted(changed), wake=False)
    discarded = len({o.item_id for o in step.outcomes}) - len(done)
    if discarded:
        logger.warning("discarded late results", extra={"batch_id": str(batch_id), "discarded": discarded})
    if claim.refused:
        logger.warning("handover refused: reservation lost", extra={"batch_id": str(batch_id), "items": claim.refused})
    return claim


def _step_locked(batch_id: uuid.UUID, worker_id: str, lease_seconds: float, step: Step) -> tuple[Claim, list[int], str]:
    """The step as a few statements after locking the batch row (SQLite; the reference)."""
    with transaction.atomic():
        batch = _lock_counters(batch_id)
        if batch is None:
            refused = [h.item_id for h in step.started]
            return Claim(items=[], pending=0, status=BatchStatus.CANCELLED, refused=refused), [], BatchStatus.CANCELLED
        was, now = batch.status, timezone.now()
        lease = now + timedelta(seconds=lease_seconds)
        ours = _running_under(worker_id, [h.item_id for h in step.started])  # a retried step's, applied
        accepted = _start_reserved(batch, worker_id=worker_id, started=step.started, lease=lease)
        done = _complete_locked(batch, worker_id=worker_id, outcomes=step.outcomes)
        given = _give_back_locked(batch, worker_id=worker_id, item_ids=step.give_back, now=now)
        finalize_if_done(batch, now)
        items = _claim_locked(batch, worker_id=worker_id, limit=step.claim, promote=step.promote, lease=lease, now=now)
        if (
            step.claim
            and not items
            and batch.status in (BatchStatus.PENDING, BatchStatus.RUNNING)
            and batch.running_items >= batch.effective_parallel
            and batch.pending_items
        ):
            _share_refused_cap(batch, worker_id=worker_id, now=now)
        limit = step.reserve + step.reserve_per_claim * len(items)
        reserved = _reserve_locked(batch, worker_id=worker_id, limit=limit, lease=lease)
        if (items or accepted) and batch.status == BatchStatus.PENDING:
            batch.status = BatchStatus.RUNNING
        if done or items or accepted or given or batch.status != was:
            _write_counters(batch, now=now, started=was == BatchStatus.PENDING and batch.status != was)
    refused = sorted({h.item_id for h in step.started} - set(accepted) - ours)
    claim = Claim(
        items=items,
        pending=batch.pending_items,
        status=batch.status,
        reserved=reserved,
        refused=refused,
        over_cap=batch.running_items > batch.effective_parallel,
        share=batch.worker_share_of(worker_id, now),
    )
    return claim, done, was


# PostgreSQL does the whole step in one statement (one round trip, no BEGIN/COMMIT): write the
# completions and start the handed-over items (lease-guarded), then lock the batch row, give
# back unwanted reservations, claim within the cap the completions freed (own reserved items
# first), reserve more, update the counters and finalize. The completions and handovers touch
# only this worker's own items and change the counters by deltas, so they are written before
# the lock (`b` waits for `written`): another worker's step on the same batch writes its own
# meanwhile, and the lock is held only for what needs the cap and the status. Whoever takes
# the batch lock and then waits for item rows (lease recovery, cancel) skips locked rows or
# waits only for rows that no step holds before the lock, so the order cannot deadlock. A
# claimer that waited for the lock reads the row as committed by the other (FOR UPDATE
# returns the latest version); items the other claimed fail the re-checked
# `status`/`lease_owner` and are skipped. A row
# is updated by one CTE only: `done` takes the handed-over items that also finished
# (`v.handed`: pending before, so their start counts now), `started` the other handovers,
# `given` the reservations given back (never handed over or promoted: the store keeps them
# apart). Mirrors `_step_locked`. Rows named by id are found by primary key: their other
# conditions are wrapped in `(…) IS TRUE` so the planner cannot choose a scan of a partial
# index over the whole batch instead (it did, with or without statistics, and a step on a
# 10,000-item batch took 25 to 60 ms instead of a few). Parameters go in binary (`%(…)b`):
# psycopg dumps a 250-element timestamp or text array in text form 8 to 15 times slower, and
# that was a quarter of the worker's CPU on no-op items.
_STEP_SQL = """
WITH v AS (
    SELECT * FROM unnest(%(ids)b::bigint[], %(statuses)b::text[], %(results)b::jsonb[], %(errors)b::text[],
                         %(finished)b::timestamptz[], %(handed)b::boolean[], %(started_at)b::timestamptz[])
        AS v (id, status, result, error, finished_at, handed, started_at)
), h AS (
    SELECT * FROM unnest(%(starts)b::bigint[], %(starts_at)b::timestamptz[]) AS h (id, started_at)
), done AS (
    UPDATE batch_job_item i SET status = v.status, result = v.result, error = v.error,
        finished_at = v.finished_at, lease_owner = '', lease_expires_at = NULL,
        attempts = i.attempts + CASE WHEN v.handed THEN 1 ELSE 0 END,
        started_at = CASE WHEN v.handed THEN v.started_at ELSE i.started_at END
    FROM v
    WHERE i.id = ANY(%(ids)b::bigint[]) AND i.id = v.id
      AND (i.batch_id = %(batch)b AND i.lease_owner = %(worker)b
           AND i.status = CASE WHEN v.handed THEN 'pending' ELSE 'running' END) IS TRUE
    RETURNING i.id, i.status, v.handed
), started AS (
    UPDATE batch_job_item i SET status = 'running', attempts = i.attempts + 1, started_at = h.started_at,
        lease_expires_at = %(lease)b
    FROM h
    WHERE i.id = ANY(%(starts)b::bigint[]) AND i.id = h.id
      AND (i.batch_id = %(batch)b AND i.status = 'pending' AND i.lease_owner = %(worker)b) IS TRUE
    RETURNING i.id
), written AS (
    SELECT count(*) FILTER (WHERE NOT handed) AS n, (SELECT count(*) FROM started) AS s,
           count(*) FILTER (WHERE status = 'succeeded') AS ok,
           count(*) FILTER (WHERE status = 'failed') AS bad, count(*) FILTER (WHERE status = 'cancelled') AS gone
    FROM done
), b AS (
    SELECT id, status, LEAST(max_parallel, %(cap)b) AS cap, total_items, running_items,
           succeeded_items, failed_items, cancelled_items
    FROM batch_job WHERE id = %(batch)b AND (SELECT n FROM written) IS NOT NULL  -- after `written`
    FOR UPDATE
), given AS (
    UPDATE batch_job_item i SET status = CASE WHEN b.status = 'cancelling' THEN 'cancelled' ELSE 'pending' END,
        finished_at = CASE WHEN b.status = 'cancelling' THEN %(now)b::timestamptz END,
        lease_owner = '', lease_expires_at = NULL
    FROM b
    WHERE i.id = ANY(%(give_back)b::bigint[])
      AND (i.batch_id = b.id AND i.status = 'pending' AND i.lease_owner = %(worker)b) IS TRUE
    RETURNING i.status
), counts AS (
    SELECT written.*, (SELECT count(*) FROM given WHERE status = 'cancelled') AS dropped FROM written
), want AS (
    SELECT GREATEST(0, LEAST(%(limit)b, b.cap - b.running_items + counts.n - counts.s)) AS n
    FROM b, counts WHERE b.status IN ('pending', 'running')
), room AS (
    SELECT coalesce(max(n), 0) AS n,
           CASE WHEN count(*) > 0 THEN %(reserve)b + %(per_claim)b * coalesce(max(n), 0) ELSE 0 END AS reserve
    FROM want
), refusal AS (
    -- The claim found the cap taken while items wait: divide the cap among the workers
    -- running the batch's items and this one, rounding down so that the others at their
    -- share leave room for it. Rare (a refused worker retries on a wake-up or a poll), so
    -- the count may scan every leased item.
    SELECT GREATEST(1, b.cap / (SELECT count(*) FROM (
               SELECT lease_owner FROM batch_job_item
               WHERE lease_expires_at IS NOT NULL AND (batch_id = %(batch)b AND status = 'running') IS TRUE
               UNION SELECT %(worker)b) w))::int AS share
    FROM b, room, counts
    WHERE %(limit)b > 0 AND room.n = 0 AND b.status IN ('pending', 'running')
      -- items still pending after this step's handovers (started, or started and finished)
      AND b.total_items - b.running_items - b.succeeded_items - b.failed_items - b.cancelled_items
          - counts.s - (counts.ok + counts.bad + counts.gone - counts.n) - counts.dropped > 0
), prom AS (
    SELECT id FROM batch_job_item
    WHERE id = ANY(%(promote)b::bigint[])
      AND (batch_id = %(batch)b AND status = 'pending' AND lease_owner = %(worker)b) IS TRUE
    ORDER BY id LIMIT (SELECT n FROM room) FOR UPDATE
), fresh AS (
    SELECT id, "index" FROM batch_job_item
    WHERE batch_id = %(batch)b AND status = 'pending' AND lease_owner = ''
    ORDER BY "index" LIMIT (SELECT n + reserve FROM room) - (SELECT count(*) FROM prom) FOR UPDATE SKIP LOCKED
), pick AS (
    SELECT id, true AS run FROM prom
    UNION ALL
    SELECT id, row_number() OVER (ORDER BY "index") <= (SELECT n FROM room) - (SELECT count(*) FROM prom) FROM fresh
), claimed AS (
    UPDATE batch_job_item i SET status = CASE WHEN p.run THEN 'running' ELSE 'pending' END,
        lease_owner = %(worker)b, lease_expires_at = %(lease)b,
        attempts = i.attempts + CASE WHEN p.run THEN 1 ELSE 0 END,
        started_at = CASE WHEN p.run THEN %(now)b::timestamptz END, finished_at = NULL
    FROM pick p WHERE i.id = ANY(ARRAY(SELECT id FROM pick)) AND i.id = p.id
    RETURNING i.id, i."index", i.params, i.attempts, p.run
), nxt AS (
    SELECT b.id, b.status AS was, b.total_items AS total, b.cap,
           b.running_items - counts.n + counts.s + (SELECT count(*) FROM claimed WHERE run) AS running,
           b.succeeded_items + counts.ok AS succeeded, b.failed_items + counts.bad AS failed,
           b.cancelled_items + counts.gone + counts.dropped AS cancelled
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
        failed_items = x.failed, cancelled_items = x.cancelled, updated_at = %(now)b,
        started_at = CASE WHEN x.was = 'pending' AND x.status <> 'pending' THEN %(now)b ELSE j.started_at END,
        finished_at = CASE WHEN x.status <> x.was AND x.status IN ('succeeded', 'failed', 'cancelled')
                      THEN %(now)b ELSE j.finished_at END,
        worker_share = coalesce((SELECT share FROM refusal), j.worker_share),
        worker_share_until = CASE WHEN EXISTS (SELECT 1 FROM refusal) THEN %(share_until)b
                             ELSE j.worker_share_until END,
        worker_share_for = CASE WHEN EXISTS (SELECT 1 FROM refusal) THEN %(worker)b ELSE j.worker_share_for END
    FROM x WHERE j.id = x.id
    RETURNING x.status, x.was, x.total - x.running - x.succeeded - x.failed - x.cancelled AS pending, x.total,
              x.running > x.cap AS over_cap,
              CASE WHEN j.worker_share_until > %(now)b AND j.worker_share_for <> %(worker)b
                   THEN j.worker_share END AS share,
              x.running < (SELECT running_items FROM b) AS freed
), summary AS (
    SELECT upd.status, upd.was, upd.pending, upd.total, upd.over_cap, upd.share,
           (SELECT coalesce(array_agg(id), '{}') FROM done) AS done_ids,
           (SELECT coalesce(array_agg(id), '{}') FROM (
                SELECT id FROM done WHERE handed UNION ALL SELECT id FROM started
                -- a retried step whose first answer was lost: its handovers already applied
                UNION ALL SELECT id FROM batch_job_item WHERE id = ANY(%(starts)b::bigint[])
                    AND (status = 'running' AND lease_owner = %(worker)b) IS TRUE) a) AS accepted,
           CASE WHEN upd.status <> upd.was AND upd.status IN ('succeeded', 'failed', 'cancelled')
                THEN pg_notify(%(channel)b, 'finished:' || %(batch)b::text)
                -- slots freed while workers share the cap: wake the waiting one
                WHEN upd.share IS NOT NULL AND upd.freed AND upd.status = 'running'
                THEN pg_notify(%(channel)b, 'room:' || %(batch)b::text) END AS notified
    FROM upd
)
-- The summary (with its id arrays) once, in the first row; one row per claimed/reserved item.
SELECT s.*, c.id, c."index", c.params, c.attempts, c.run
FROM summary s LEFT JOIN claimed c ON true
WHERE c.id IS NULL OR c.id = (SELECT min(id) FROM claimed)
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, c.id, c."index", c.params, c.attempts, c.run
FROM claimed c WHERE c.id > (SELECT min(id) FROM claimed)
"""


def _step_postgres(
    batch_id: uuid.UUID, worker_id: str, lease_seconds: float, step: Step
) -> tuple[Claim, list[int], str]:
    """The step as one statement; (claim, ids of the items written, status before)."""
    by_id = {outcome.item_id: outcome for outcome in step.outcomes}
    handed = {handover.item_id: handover.started_at for handover in step.started}
    starts = {item_id: at for item_id, at in handed.items() if item_id not in by_id}  # still running
    now = timezone.now()
    params = {
        "batch": batch_id,
        "cap": settings.BATCH_GLOBAL_MAX_PARALLEL,
        "worker": worker_id,
        "limit": step.claim,
        "reserve": step.reserve,
        "per_claim": step.reserve_per_claim,
        "promote": step.promote,
        "lease": now + timedelta(seconds=lease_seconds),
        "now": now,
        "channel": CONTROL_CHANNEL,
        "ids": list(by_id),
        "statuses": [str(o.status) for o in by_id.values()],
        "results": [None if o.result is None else json.dumps(o.result) for o in by_id.values()],
        "errors": [o.error for o in by_id.values()],
        "finished": [o.finished_at for o in by_id.values()],
        "handed": [item_id in handed for item_id in by_id],
        "started_at": [handed.get(item_id) for item_id in by_id],
        "starts": list(starts),
        "starts_at": list(starts.values()),
        "give_back": step.give_back,
        "share_until": now + timedelta(seconds=SHARE_SECONDS),
    }
    with _hot_cursor() as cursor:
        # Prepared once per connection: parsing and planning were a third of its server time.
        cursor.execute(_STEP_SQL, params, prepare=settings.DATABASE_PREPARED_STATEMENTS)
        rows = cursor.fetchall()
    if not rows:
        return Claim(items=[], pending=0, status=BatchStatus.CANCELLED, refused=list(handed)), [], BatchStatus.CANCELLED
    status, was, pending, total, over_cap, share, done, accepted, *_ = next(r for r in rows if r[0] is not None)
    if status != was and status in TERMINAL_BATCH_STATUSES:
        logger.info("batch finished", extra={"batch_id": str(batch_id), "status": status, "total": total})
    picked = sorted((r[9:] for r in rows if r[9] is not None), key=lambda row: row[1])
    claim = Claim(
        items=_claimed_items([row[:4] for row in picked if row[4]]),
        pending=pending,
        status=status,
        reserved=_claimed_items([(i, x, p, a + 1) for i, x, p, a, run in picked if not run]),
        refused=sorted(set(handed) - set(accepted)),
        over_cap=over_cap,
        share=share,
    )
    return claim, list(done), was


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
    """Give items back: running ones (graceful shutdown) pending again, the attempt not
    counted; reserved ones unreserved. In a cancelling batch both become cancelled instead.

    Returns how many were released.
    """
    with transaction.atomic():
        batch = lock_batch(batch_id)
        mine = BatchJobItem.objects.filter(pk__in=list(item_ids), lease_owner=worker_id)
        running, reserved = mine.filter(status=ItemStatus.RUNNING), mine.filter(status=ItemStatus.PENDING)
        now = timezone.now()
        cleared = {"lease_owner": "", "lease_expires_at": None}
        if batch.status == BatchStatus.CANCELLING:
            stopped = running.update(
                status=ItemStatus.CANCELLED, finished_at=now, error="Cancelled while its worker shut down.", **cleared
            )
            unstarted = reserved.update(status=ItemStatus.CANCELLED, finished_at=now, **cleared)
            batch.cancelled_items += stopped + unstarted
        else:
            stopped = running.update(status=ItemStatus.PENDING, attempts=F("attempts") - 1, started_at=None, **cleared)
            unstarted = reserved.update(**cleared)
        batch.running_items -= stopped
        finalize_if_done(batch, now)
        save_counters(batch)
        notify(batch_id, "released", list(item_ids))
    return stopped + unstarted
