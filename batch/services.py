"""Every state transition of batches and items. Nothing else writes batch state.

Each function is one short synchronous transaction. Transactions that touch a batch's items
lock the batch row first (`SELECT … FOR UPDATE`): that fixes a lock order (no deadlocks), keeps
the counters exact, and makes the parallelism cap hold across every worker process.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import psycopg
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework import serializers

from batch import limits
from batch.handlers import HandlerSpec, UnknownHandler, get_handler, registered_handlers
from batch.models import (
    TERMINAL_BATCH_STATUSES,
    AuditAction,
    BatchAuditEvent,
    BatchJob,
    BatchJobItem,
    BatchStatus,
    BatchWorker,
    ItemStatus,
)
from batch.signals import batch_changed

logger = logging.getLogger(__name__)

SUBMIT_CHUNK_SIZE = 10_000  # items per write (one COPY on PostgreSQL); Django splits bulk_create further
COMPLETE_CHUNK_SIZE = 500  # rows per UPDATE … FROM (VALUES …): 5 parameters each
MAX_REPORTED_ITEM_ERRORS = 100
MAX_PARALLEL_LIMIT = 10_000
CONTROL_CHANNEL = "batch_control"

Actor = AbstractBaseUser | AnonymousUser | None


def _as_user(actor: Actor) -> User | None:
    """The user to record for `actor`; None for anonymous or system (command, worker) calls."""
    if actor is None or not actor.is_authenticated:
        return None
    return cast(User, actor)


# --- results and errors ---------------------------------------------------------------------


class SubmitError(Exception):
    """The submission was refused; nothing was written. `errors` is keyed by field."""

    def __init__(self, errors: dict[str, Any], *, too_many_items: bool = False) -> None:
        super().__init__(f"batch submission refused: {', '.join(errors)} invalid")
        self.errors = errors
        self.too_many_items = too_many_items


class InvalidValue(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name
        self.message = message


@dataclass(frozen=True)
class SubmitResult:
    batch: BatchJob
    created: bool


class CancelOutcome(enum.Enum):
    REQUESTED = "requested"  # this call moved the batch to cancelling (or straight to cancelled)
    ALREADY_CANCELLING = "already_cancelling"
    TERMINAL = "terminal"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class CancelResult:
    outcome: CancelOutcome
    batch: BatchJob | None


@dataclass(frozen=True)
class ClaimedItem:
    id: int
    index: int
    params: dict[str, Any]
    attempt: int


@dataclass(frozen=True)
class Claim:
    items: list[ClaimedItem]
    pending: int  # items of the batch still pending after this claim
    status: str


@dataclass(frozen=True)
class Outcome:
    item_id: int
    status: ItemStatus
    result: Any = None
    error: str = ""
    finished_at: datetime = field(default_factory=timezone.now)


# --- helpers --------------------------------------------------------------------------------


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _lock_batch(batch_id: uuid.UUID) -> BatchJob:
    """The batch row, locked until the transaction ends. Raises BatchJob.DoesNotExist."""
    return BatchJob.objects.select_for_update().get(pk=batch_id)


def _finalize_if_done(batch: BatchJob, now: datetime) -> None:
    """Move a locked batch whose items have all stopped to its terminal status."""
    if batch.running_items or batch.pending_items or batch.is_terminal:
        return
    if batch.status == BatchStatus.CANCELLING:
        batch.status = BatchStatus.CANCELLED
    elif batch.failed_items or batch.cancelled_items:
        batch.status = BatchStatus.FAILED
    else:
        batch.status = BatchStatus.SUCCEEDED
    batch.finished_at = now
    logger.info(
        "batch finished",
        extra={"batch_id": str(batch.id), "status": batch.status, "total": batch.total_items},
    )


_COUNTER_FIELDS = [
    "status",
    "running_items",
    "succeeded_items",
    "failed_items",
    "cancelled_items",
    "started_at",
    "finished_at",
    "updated_at",
]


def _save_counters(batch: BatchJob) -> None:
    batch.save(update_fields=_COUNTER_FIELDS)


def _notify(batch_id: uuid.UUID, kind: str, item_ids: Sequence[int] = (), *, wake: bool = True) -> None:
    """Tell the world about a change, once the transaction commits.

    `batch_changed` always fires (the dashboard's events). With `wake`, PostgreSQL also
    delivers `kind:batch_id` on the control channel (NOTIFY is transactional) to workers and
    cancel waiters; the per-item hot path (claims, completions that don't end the batch)
    does not wake anyone, or every worker would re-poll on every item.
    """
    if wake and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CONTROL_CHANNEL, f"{kind}:{batch_id}"])
    ids = list(item_ids)
    # send_robust: a failing listener must never fail (or re-run) the transaction's caller.
    transaction.on_commit(lambda: batch_changed.send_robust(BatchJob, batch_id=batch_id, item_ids=ids))


def _audit(batch_id: uuid.UUID, action: AuditAction, actor: Actor, at: datetime, **details: Any) -> None:
    """Record who did what to a batch; called inside the transaction of the change."""
    user = _as_user(actor)
    name = user.get_username() if user else ""
    BatchAuditEvent.objects.create(
        batch_id=batch_id, action=action, actor=user, actor_name=name, at=at, details=details
    )


def effective_parallel(max_parallel: int) -> int:
    return min(max_parallel, settings.BATCH_GLOBAL_MAX_PARALLEL)


# --- submit ---------------------------------------------------------------------------------


def _validate_items(spec: HandlerSpec, items: object) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise SubmitError({"items": ["Expected a list of item parameter objects."]})
    if not items:
        raise SubmitError({"items": ["A batch needs at least one item."]})
    limit = settings.BATCH_MAX_ITEMS_PER_BATCH
    if len(items) > limit:
        raise SubmitError(
            {"items": [f"A batch may hold at most {limit} items; got {len(items)}."]},
            too_many_items=True,
        )
    validated: list[dict[str, Any]] = []
    errors: dict[str, Any] = {}
    for index, params in enumerate(items):
        try:
            validated.append(_validate_item(spec, params))
        except serializers.ValidationError as exc:
            if len(errors) < MAX_REPORTED_ITEM_ERRORS:
                errors[str(index)] = exc.detail
    if errors:
        raise SubmitError({"items": errors})
    return validated


def _validate_item(spec: HandlerSpec, params: object) -> dict[str, Any]:
    """The handler's validation, after the shared limits (NUL, nesting depth, size)."""
    problem = limits.params_problem(params)
    if problem is not None:
        raise serializers.ValidationError([problem])
    return spec.validate(params)


def _validate_submission(handler: str, items: object, max_parallel: int, name: str) -> list[dict[str, Any]]:
    if (problem := limits.text_problem(handler, max_length=limits.MAX_NAME_LENGTH)) is not None:
        raise SubmitError({"handler": [problem]})
    try:
        spec = get_handler(handler)
    except UnknownHandler:
        known = ", ".join(registered_handlers())
        raise SubmitError({"handler": [f"Unknown handler {handler!r}. Known handlers: {known}."]}) from None
    if not 1 <= max_parallel <= MAX_PARALLEL_LIMIT:
        raise SubmitError({"max_parallel": [f"Must be between 1 and {MAX_PARALLEL_LIMIT}."]})
    if (problem := limits.text_problem(name, max_length=limits.MAX_NAME_LENGTH)) is not None:
        raise SubmitError({"name": [problem]})
    return _validate_items(spec, items)


def submit_batch(
    *,
    handler: str,
    items: object,
    max_parallel: int | None = None,
    name: str = "",
    created_by: Actor = None,
    idempotency_key: str | None = None,
) -> SubmitResult:
    """Validate every item, then write the batch and all its items in one transaction.

    Raises SubmitError (nothing written). With `idempotency_key`, a repeat by the same user
    returns the batch first created with that key, also under concurrent identical requests.
    """
    owner = _as_user(created_by)
    if idempotency_key is not None:
        if (problem := limits.text_problem(idempotency_key, max_length=limits.MAX_IDEMPOTENCY_KEY_LENGTH)) is not None:
            raise SubmitError({"idempotency_key": [problem]})
        existing = BatchJob.objects.filter(created_by=owner, idempotency_key=idempotency_key).first()
        if existing is not None:
            return SubmitResult(batch=existing, created=False)
    max_parallel = settings.BATCH_GLOBAL_MAX_PARALLEL if max_parallel is None else max_parallel
    validated = _validate_submission(handler, items, max_parallel, name)
    try:
        batch = _insert_batch(
            handler=handler,
            params=validated,
            max_parallel=max_parallel,
            name=name,
            owner=owner,
            idempotency_key=idempotency_key,
        )
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = BatchJob.objects.filter(created_by=owner, idempotency_key=idempotency_key).first()
        if existing is None:
            raise
        return SubmitResult(batch=existing, created=False)
    return SubmitResult(batch=batch, created=True)


def _insert_batch(
    *,
    handler: str,
    params: list[dict[str, Any]],
    max_parallel: int,
    name: str,
    owner: User | None,
    idempotency_key: str | None,
) -> BatchJob:
    with transaction.atomic():
        batch = BatchJob.objects.create(
            handler=handler,
            name=name,
            max_parallel=max_parallel,
            max_attempts=settings.BATCH_MAX_ATTEMPTS,
            total_items=len(params),
            created_by=owner,
            idempotency_key=idempotency_key,
        )
        _insert_items(batch.id, params)
        _audit(batch.id, AuditAction.SUBMITTED, owner, batch.created_at, items=len(params), max_parallel=max_parallel)
        _notify(batch.id, "submitted")
    logger.info(
        "batch submitted",
        extra={"batch_id": str(batch.id), "handler": handler, "total": len(params)},
    )
    return batch


def _insert_items(batch_id: uuid.UUID, params: list[dict[str, Any]]) -> None:
    """All items of a new batch, SUBMIT_CHUNK_SIZE per write, in the caller's transaction."""
    for start in range(0, len(params), SUBMIT_CHUNK_SIZE):
        _write_item_chunk(batch_id, start, params[start : start + SUBMIT_CHUNK_SIZE])


def _write_item_chunk(batch_id: uuid.UUID, start: int, chunk: list[dict[str, Any]]) -> None:
    """Items `start`, `start + 1`, … : COPY on PostgreSQL (the ORM's bulk_create spent most of
    a 100,000-item submit building model instances and quoting values), bulk_create elsewhere."""
    if connection.vendor != "postgresql":
        rows = [BatchJobItem(batch_id=batch_id, index=start + offset, params=item) for offset, item in enumerate(chunk)]
        BatchJobItem.objects.bulk_create(rows)
        return
    # Every column but the key, with the model's defaults: a column added later is filled too.
    template = BatchJobItem(batch_id=batch_id, index=0, params={})
    fields = [f for f in BatchJobItem._meta.concrete_fields if not f.primary_key]
    row = [f.get_db_prep_save(f.pre_save(template, add=True), connection) for f in fields]
    at = {f.attname: position for position, f in enumerate(fields)}
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    params_field = BatchJobItem._meta.get_field("params")
    with (
        connection.wrap_database_errors,
        connection.connection.cursor() as cursor,
        cursor.copy(f"COPY batch_job_item ({columns}) FROM STDIN") as copy,
    ):
        for offset, item in enumerate(chunk):
            row[at["index"]] = start + offset
            row[at["params"]] = params_field.get_db_prep_save(item, connection)
            copy.write_row(row)


# --- claim and complete ---------------------------------------------------------------------
# The worker's hot path: finished items are completed and the next ones claimed in one
# transaction of a few set-based statements. Plain SQL here: the ORM (bulk_update above all)
# cost more than the database on this path (docs/BENCHMARKS.md has the profile).


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
    for chunk in _chunks(by_id.values(), COMPLETE_CHUNK_SIZE):
        written += _complete_chunk(worker_id, chunk)
    _apply_finished(batch, [status for _, status in written])
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
        _notify(batch_id, "completed", [*done, *(i.id for i in claim.items)], wake=False)
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
        _finalize_if_done(batch, now)
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


def _apply_finished(batch: BatchJob, statuses: Iterable[str]) -> None:
    for status in statuses:
        batch.running_items -= 1
        if status == ItemStatus.SUCCEEDED:
            batch.succeeded_items += 1
        elif status == ItemStatus.FAILED:
            batch.failed_items += 1
        else:
            batch.cancelled_items += 1


def release_items(*, batch_id: uuid.UUID, worker_id: str, item_ids: Sequence[int]) -> int:
    """Give running items back (graceful shutdown): pending again, the attempt not counted.

    In a cancelling batch they become cancelled instead. Returns how many were released.
    """
    with transaction.atomic():
        batch = _lock_batch(batch_id)
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
        _finalize_if_done(batch, now)
        _save_counters(batch)
        _notify(batch_id, "released", list(item_ids))
    return released


# --- cancel and resize ----------------------------------------------------------------------


def request_cancel(*, batch_id: uuid.UUID, by: Actor = None) -> CancelResult:
    """Start cancelling: the batch → cancelling, its pending items → cancelled at once.

    Workers see the request (notification, else their poll) and stop the running items
    cooperatively; the last one to stop moves the batch to cancelled.
    """
    with transaction.atomic():
        try:
            batch = _lock_batch(batch_id)
        except BatchJob.DoesNotExist:
            return CancelResult(CancelOutcome.NOT_FOUND, None)
        if batch.is_terminal:
            return CancelResult(CancelOutcome.TERMINAL, batch)
        if batch.status == BatchStatus.CANCELLING:
            return CancelResult(CancelOutcome.ALREADY_CANCELLING, batch)
        now = timezone.now()
        cancelled = BatchJobItem.objects.filter(batch_id=batch_id, status=ItemStatus.PENDING).update(
            status=ItemStatus.CANCELLED, finished_at=now
        )
        _audit(batch_id, AuditAction.CANCEL_REQUESTED, by, now, status=batch.status, pending_cancelled=cancelled)
        batch.cancelled_items += cancelled
        batch.status = BatchStatus.CANCELLING
        batch.cancel_requested_at = now
        batch.cancel_requested_by = _as_user(by)
        _finalize_if_done(batch, now)
        batch.save(update_fields=[*_COUNTER_FIELDS, "cancel_requested_at", "cancel_requested_by"])
        _notify(batch_id, "cancel")
    logger.info("batch cancel requested", extra={"batch_id": str(batch_id), "status": batch.status})
    return CancelResult(CancelOutcome.REQUESTED, batch)


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
        batch = _lock_batch(batch_id)
        if batch.is_terminal:
            return None
        _audit(batch_id, AuditAction.RESIZED, by, timezone.now(), old=batch.max_parallel, new=max_parallel)
        batch.max_parallel = max_parallel
        batch.save(update_fields=["max_parallel", "updated_at"])
        _notify(batch_id, "resize")
    logger.info("batch resized", extra={"batch_id": str(batch_id), "max_parallel": max_parallel})
    return batch


# --- leases and workers ---------------------------------------------------------------------


def renew_leases(*, worker_id: str, item_ids: Sequence[int], lease_seconds: float) -> int:
    """Extend the leases of the items `worker_id` is running, and its own heartbeat.

    Only the ids the worker knows it runs: an item claimed by a transaction whose answer
    was lost (connection dropped at commit) is left to expire and be taken back.
    """
    now = timezone.now()
    with transaction.atomic():
        BatchWorker.objects.filter(pk=worker_id).update(heartbeat_at=now)
        return BatchJobItem.objects.filter(
            pk__in=list(item_ids), status=ItemStatus.RUNNING, lease_owner=worker_id
        ).update(lease_expires_at=now + timedelta(seconds=lease_seconds))


def recover_expired_leases() -> int:
    """Take back items whose worker stopped renewing their lease.

    Retried (→ pending) while attempts remain, otherwise failed; in a cancelling batch,
    cancelled. Returns how many items were taken back.
    """
    now = timezone.now()
    batch_ids = set(
        BatchJobItem.objects.filter(status=ItemStatus.RUNNING, lease_expires_at__lt=now).values_list(
            "batch_id", flat=True
        )
    )
    taken = 0
    for batch_id in batch_ids:
        with contextlib.suppress(BatchJob.DoesNotExist):  # deleted since the read above
            taken += _recover_batch_leases(batch_id, now)
    return taken


def _recover_batch_leases(batch_id: uuid.UUID, now: datetime) -> int:
    with transaction.atomic():
        batch = _lock_batch(batch_id)
        expired = BatchJobItem.objects.filter(batch_id=batch_id, status=ItemStatus.RUNNING, lease_expires_at__lt=now)
        taken = list(expired.select_for_update().values_list("pk", flat=True))
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
        _finalize_if_done(batch, now)
        _save_counters(batch)
        _notify(batch_id, "recovered", taken)
    if count:
        logger.warning("recovered expired leases", extra={"batch_id": str(batch_id), "items": count})
    return count


def register_worker(*, worker_id: str, hostname: str, pid: int, concurrency: int, lease_seconds: float) -> None:
    """Record a starting worker; refuse an id whose holder still heartbeats.

    Raises InvalidValue when another live worker already uses `worker_id`.
    """
    now = timezone.now()
    with transaction.atomic():
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
    BatchWorker.objects.filter(pk=worker_id).update(stopped_at=timezone.now())
