"""The worker's hot path: one step writes what a worker did on a batch and fetches what it holds next.

The step holds no cap rule: the cap is enforced by the slot permits (`permits.py`), and a worker
starts items only within them. A step, in one transaction and the same statements on PostgreSQL
and SQLite:

1. `started`: held items the worker started → running (lease-guarded; a retried step's starts
   that already applied are accepted again, so a lost reply leaves no phantom running item);
2. `outcomes`: items still running under the worker's lease → finished, or back to pending
   after a backoff for a failed attempt to be retried (a late result of an item the worker lost
   is discarded; a retry in a batch that is being stopped is cancelled instead);
3. `give_back`: held items it no longer wants → unleased, or cancelled in a cancelling batch
   (only this part locks the batch row first: it serializes with a cancel);
4. the counters change by the deltas of 1 to 3 in one UPDATE of the batch row, which also moves
   the batch to running on its first start and to its terminal status after its last item;
5. `fetch`: up to that many unleased pending items, in index order, become held by the worker
   (`SKIP LOCKED`), if the batch still runs.

Lock order, as in every transaction here: the batch row before unleased items (a cancel's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from django.db import connection, transaction
from django.utils import timezone

from batch.models import (
    TERMINAL_BATCH_STATUSES,
    BatchStatus,
    ItemStatus,
    StatusReason,
)
from batch.services import callbacks, stops
from batch.services._base import (
    STOPPABLE,
    ClaimedItem,
    Outcome,
    Start,
    Step,
    StepResult,
    chunks,
    db_later_column_sql,
    db_later_sql,
    db_statement_now_sql,
    db_uuid,
    lock_batch,
    notify,
    sql_marks,
    stopped_status,
)

logger = logging.getLogger(__name__)

CHUNK_SIZE = 500  # rows per UPDATE … FROM (VALUES …)
ERRORS_KEPT = 5  # failed attempts kept in an item's `errors`
ACTIVE = (BatchStatus.PENDING, BatchStatus.RUNNING)


def run_step(*, batch_id: uuid.UUID, worker_id: str, lease_seconds: float, step: Step) -> StepResult:
    """Write one step of `worker_id` on the batch (see the module docstring)."""
    now = timezone.now()
    finishing = {outcome.item_id for outcome in step.outcomes}
    with transaction.atomic():
        status = lock_batch(batch_id).status if step.give_back else None
        starts = [start for start in step.started if start.item_id not in finishing]
        new_starts, accepted = _start(batch_id, worker_id, starts, lease_seconds)
        at_once = {start.item_id: start.started_at for start in step.started if start.item_id in finishing}
        done = _complete(worker_id, step.outcomes, started=at_once)
        accepted |= {item_id for item_id, _, was_held in done if was_held}
        cancelled = _give_back(batch_id, worker_id, step.give_back, cancel=status == BatchStatus.CANCELLING, now=now)
        if new_starts or done or cancelled:
            from_running = [status for _, status, was_held in done if not was_held]
            ended_at_once = [status for _, status, was_held in done if was_held]
            retried = [item_id for item_id, status, _ in done if status == ItemStatus.PENDING]
            status = _apply_counters(
                batch_id,
                started=new_starts,
                finished=from_running,
                at_once=ended_at_once,
                cancelled=cancelled,
                retried=retried,
            )
            changed = sorted({*accepted, *(i for i, _, _ in done)})
            notify(batch_id, "completed", changed, wake=status in TERMINAL_BATCH_STATUSES)
        # Last: a cancel locks the batch row and then waits for the unleased pending rows this
        # locks, so this step must already hold (or not need) the batch row by now.
        fetched = _fetch(batch_id, worker_id, step.fetch, lease_seconds) if step.fetch else []
    refused = sorted({s.item_id for s in step.started} - accepted)
    if refused:
        logger.warning(
            "starts refused: the items' leases were lost", extra={"batch_id": str(batch_id), "items": refused}
        )
    discarded = len(finishing) - len(done)
    if discarded:
        logger.warning("discarded late results", extra={"batch_id": str(batch_id), "discarded": discarded})
    return StepResult(fetched=fetched, status=status, refused=refused)


def _db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


@contextlib.contextmanager
def _cursor() -> Iterator[Any]:
    """On PostgreSQL a psycopg cursor with server-side binding on Django's connection (same
    transaction; Django's own quotes every value into the text in Python), so the step's rows
    travel as binary arrays; on SQLite Django's cursor. Errors still become Django's."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            yield cursor
        return
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


def _rows(types: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
    """A derived table `v` with columns c1, c2, … holding `rows`: one binary array per column
    on PostgreSQL (`unnest`), a VALUES list on SQLite. The statements around it are the same."""
    names = [f"c{n}" for n in range(1, len(types) + 1)]
    if connection.vendor == "postgresql":
        arrays = ", ".join(f"%b::{sql_type}[]" for sql_type in types)
        return f"unnest({arrays}) AS v ({', '.join(names)})", [list(column) for column in zip(*rows, strict=True)]
    marks = ", ".join([f"({', '.join(['%s'] * len(types))})"] * len(rows))
    columns = ", ".join(f"column{n} AS {name}" for n, name in enumerate(names, 1))
    return f"(SELECT {columns} FROM (VALUES {marks})) AS v", [value for row in rows for value in row]


def _ids(ids: Sequence[int]) -> tuple[str, list[Any]]:
    """`batch_job_item.id` among `ids`: what makes the planner look rows up by primary key."""
    if connection.vendor == "postgresql":
        return "batch_job_item.id = ANY(%b::bigint[])", [list(ids)]
    return f"batch_job_item.id IN ({sql_marks(ids)})", list(ids)


def _outcome_row(o: Outcome, started_at: datetime | None) -> tuple[Any, ...]:
    began = None if started_at is None else _db_time(started_at)
    failed = o.status in (ItemStatus.FAILED, ItemStatus.PENDING)  # its error goes into `errors`
    finished, retry_in, at = _db_time(o.finished_at), o.retry_in, o.finished_at.isoformat() if failed else None
    row = (o.item_id, str(o.status), _json(o.result), o.error, finished, began is not None, began, retry_in, at)
    return (*row, o.attempt)


def _errors_sql() -> str:
    """The new `errors` of an outcome's row: with a failed attempt (failed, or pending again to
    be retried) appended as {attempt, error, at}, the oldest dropped beyond ERRORS_KEPT."""
    attempt = "attempts + CASE WHEN v.c6 THEN 1 ELSE 0 END"
    if connection.vendor == "postgresql":
        kept = f"CASE WHEN jsonb_array_length(errors) >= {ERRORS_KEPT} THEN errors - 0 ELSE errors END"
        entry = f"jsonb_build_array(jsonb_build_object('attempt', {attempt}, 'error', v.c4, 'at', v.c9))"
        added = f"{kept} || {entry}"
    else:
        kept = f"CASE WHEN json_array_length(errors) >= {ERRORS_KEPT} THEN json_remove(errors, '$[0]') ELSE errors END"
        added = f"json_insert({kept}, '$[#]', json_object('attempt', {attempt}, 'error', v.c4, 'at', v.c9))"
    return f"CASE WHEN v.c9 IS NOT NULL THEN {added} ELSE errors END"  # c9: set for failed attempts only


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


# Rows named by id are found by primary key: the statements wrap their other conditions in
# `(…) IS TRUE`, so the planner cannot choose a scan of the batch's partial pending index
# instead (it does, with or without statistics: a step on a 10,000-item batch took 25 to 60 ms
# instead of a few).


def _start(batch_id: uuid.UUID, worker_id: str, starts: Sequence[Start], lease_seconds: float) -> tuple[int, set[int]]:
    """Held items → running; (how many moved now, every start accepted)."""
    moved: set[int] = set()
    later, later_params = db_later_sql(lease_seconds)
    for chunk in chunks(starts, CHUNK_SIZE):
        rows, params = _rows(["bigint", "timestamptz"], [(s.item_id, _db_time(s.started_at)) for s in chunk])
        by_id, id_params = _ids([s.item_id for s in chunk])
        with _cursor() as cursor:
            cursor.execute(
                f"UPDATE batch_job_item SET status = %s, attempts = attempts + 1, started_at = v.c2,"
                f" lease_expires_at = {later} FROM {rows} WHERE {by_id} AND batch_job_item.id = v.c1"
                " AND (batch_job_item.batch_id = %s"
                " AND batch_job_item.status = 'pending' AND batch_job_item.lease_owner = %s) IS TRUE"
                " RETURNING batch_job_item.id",
                [ItemStatus.RUNNING, *later_params, *params, *id_params, db_uuid(batch_id), worker_id],
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
            f"SELECT id FROM batch_job_item WHERE id IN ({sql_marks(item_ids)}) AND status = %s AND lease_owner = %s",
            [*item_ids, ItemStatus.RUNNING, worker_id],
        )
        return {int(row[0]) for row in cursor.fetchall()}


def _complete(
    worker_id: str, outcomes: Sequence[Outcome], *, started: Mapping[int, datetime]
) -> list[tuple[int, str, bool]]:
    """Outcomes of items still running under `worker_id`'s lease → written; (id, status, was
    held) of each. An item in `started` started and finished since the last step: it goes from
    held to finished in one write (its start counted), the usual case for short items."""
    by_id = {outcome.item_id: outcome for outcome in outcomes}
    written: list[tuple[int, str, bool]] = []
    types = ["bigint", "text", "jsonb", "text", "timestamptz", "boolean", "timestamptz", "float8", "text", "integer"]
    for chunk in chunks(by_id.values(), CHUNK_SIZE):
        values = [_outcome_row(o, started.get(o.item_id)) for o in chunk]
        rows, params = _rows(types, values)
        by_id_sql, id_params = _ids([o.item_id for o in chunk])
        with _cursor() as cursor:
            # A retry (c8: its backoff) waits as pending, unstarted, until `available_at`.
            cursor.execute(
                f"UPDATE batch_job_item SET status = v.c2, result = v.c3, error = v.c4, errors = {_errors_sql()},"
                " finished_at = CASE WHEN v.c8 IS NULL THEN v.c5 END,"
                f" available_at = CASE WHEN v.c8 IS NULL THEN available_at ELSE {db_later_column_sql('v.c8')} END,"
                " attempts = attempts + CASE WHEN v.c6 THEN 1 ELSE 0 END,"
                " started_at = CASE WHEN v.c8 IS NOT NULL THEN NULL WHEN v.c6 THEN v.c7 ELSE started_at END,"
                f" lease_owner = '', lease_expires_at = NULL FROM {rows} WHERE {by_id_sql} AND batch_job_item.id = v.c1"
                " AND (batch_job_item.lease_owner = %s"
                " AND batch_job_item.status = CASE WHEN v.c6 THEN 'pending' ELSE 'running' END"
                " AND (v.c10 IS NULL OR batch_job_item.attempts + CASE WHEN v.c6 THEN 1 ELSE 0 END = v.c10)) IS TRUE"
                " RETURNING batch_job_item.id, batch_job_item.status",
                [*params, *id_params, worker_id],
            )
            # An item in `started` matched only as a held one (the CASE): it was held.
            written += [(int(i), str(status), int(i) in started) for i, status in cursor.fetchall()]
    return written


def _give_back(batch_id: uuid.UUID, worker_id: str, item_ids: Sequence[int], *, cancel: bool, now: datetime) -> int:
    """Held items → unleased (cancelled if `cancel`); how many were cancelled."""
    status, finished = (ItemStatus.CANCELLED, _db_time(now)) if cancel else (ItemStatus.PENDING, None)
    count = 0
    for chunk in chunks(item_ids, CHUNK_SIZE):
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE batch_job_item SET status = %s, finished_at = %s, lease_owner = '', lease_expires_at = NULL"
                f" WHERE id IN ({sql_marks(chunk)}) AND batch_id = %s AND status = %s AND lease_owner = %s",
                [status, finished, *chunk, db_uuid(batch_id), ItemStatus.PENDING, worker_id],
            )
            count += int(cursor.rowcount)
    return count if cancel else 0


def _fetch(batch_id: uuid.UUID, worker_id: str, limit: int, lease_seconds: float) -> list[ClaimedItem]:
    """Up to `limit` unleased pending items of a running batch → held by `worker_id`."""
    skip = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    later, later_params = db_later_sql(lease_seconds)
    now, now_params = db_later_sql(0)
    batch = db_uuid(batch_id)
    with _cursor() as cursor:
        cursor.execute(
            f"UPDATE batch_job_item SET lease_owner = %s, lease_expires_at = {later} WHERE id IN ("
            "SELECT id FROM batch_job_item WHERE batch_id = %s AND status = 'pending' AND lease_owner = ''"
            f" AND (available_at IS NULL OR available_at <= {now})"
            f' ORDER BY "index" LIMIT %s{skip})'
            " AND EXISTS (SELECT 1 FROM batch_job WHERE id = %s AND status IN ('pending', 'running'))"
            ' RETURNING id, "index", params, attempts, (SELECT max_attempts FROM batch_job WHERE id = %s)',
            [worker_id, *later_params, batch, *now_params, limit, batch, batch],
        )
        rows = sorted(cursor.fetchall(), key=lambda row: row[1])
    # The attempt an item will be when it starts.
    return [
        ClaimedItem(id=i, index=x, params=json.loads(p) if isinstance(p, str) else p, attempt=a + 1, max_attempts=m)
        for i, x, p, a, m in rows
    ]


def _apply_counters(
    batch_id: uuid.UUID,
    *,
    started: int,
    finished: Sequence[str],
    at_once: Sequence[str],
    cancelled: int,
    retried: Sequence[int],
) -> str:
    """Change the batch's counters by the step's deltas (the row lock is held only from here to
    the commit) and move its status on; the status after. `finished` ended from running,
    `at_once` started and ended within the step (never counted as running); either may hold
    `pending`: an attempt to be `retried` (their ids), which counts as no longer running only."""
    ended = [*finished, *at_once]
    succeeded = sum(1 for s in ended if s == ItemStatus.SUCCEEDED)
    failed = sum(1 for s in ended if s == ItemStatus.FAILED)
    gone = sum(1 for s in ended if s == ItemStatus.CANCELLED) + cancelled
    began = started + len(at_once)
    now = _db_time(timezone.now())
    stamp = db_statement_now_sql()  # `started_at` starts the deadline: the database's clock
    params: list[Any] = [started - len(finished), succeeded, failed, gone, BatchStatus.PENDING, began]
    params += [BatchStatus.RUNNING, began, now, db_uuid(batch_id)]
    with _cursor() as cursor:
        cursor.execute(
            "UPDATE batch_job SET running_items = running_items + %s, succeeded_items = succeeded_items + %s,"
            " failed_items = failed_items + %s, cancelled_items = cancelled_items + %s,"
            " status = CASE WHEN status = %s AND %s > 0 THEN %s ELSE status END,"
            f" started_at = CASE WHEN started_at IS NULL AND %s > 0 THEN {stamp} ELSE started_at END, updated_at = %s"
            " WHERE id = %s"
            " RETURNING status, total_items, running_items, succeeded_items, failed_items, cancelled_items,"
            f" CASE WHEN started_at = {stamp} THEN 1 ELSE 0 END, max_failures, status_reason",
            params,
        )
        row = cursor.fetchone()
        if row is None:
            return BatchStatus.CANCELLED  # deleted meanwhile
        status, total, running, ok, bad, cancelled_now, began_now, max_failures, reason = row
        if began_now and began:
            logger.info("batch started", extra={"batch_id": str(batch_id)})
        if retried and status == BatchStatus.CANCELLING:
            cancelled_now += stops.cancel_retries(cursor, batch_id, retried)
        if max_failures is not None and bad >= max_failures and status in STOPPABLE:
            stopped = stops.stop_at_failure_threshold(cursor, batch_id)
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
            f"UPDATE batch_job SET status = %s, finished_at = {stamp} WHERE id = %s RETURNING callback_url",
            [final, db_uuid(batch_id)],
        )
        callback_url = cursor.fetchone()[0]
    logger.info("batch finished", extra={"batch_id": str(batch_id), "status": final, "total": total})
    callbacks.record_finish(batch_id=batch_id, status=final, callback_url=callback_url)
    return str(final)
