"""Reads: what the worker, the API and the admin look up. No writes here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from django.db.models import BooleanField, Count, Exists, F, OuterRef, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

from batch import permissions
from batch.models import BatchCallback, BatchJob, BatchJobItem, BatchPermit, BatchStatus, ItemStatus
from batch.services._base import STOPPABLE, db_deadline_passed_sql, db_later_sql, db_uuid


@dataclass(frozen=True)
class BatchState:
    """What a worker watches of a batch it runs."""

    status: str
    max_parallel: int
    force_due: bool = False  # past the cancel's force deadline, by the database's clock
    deadline_due: bool = False  # unfinished and past its `deadline_seconds`, by the database's clock

    @property
    def effective_parallel(self) -> int:
        return min(self.max_parallel, settings.BATCH_GLOBAL_MAX_PARALLEL)


def runnable_batches(
    *, exclude: Iterable[uuid.UUID] = (), only: uuid.UUID | None = None
) -> list[tuple[uuid.UUID, str, int | None]]:
    """(id, handler, owner id) of batches with pending items, oldest first; not one whose
    pending items all wait out a retry's backoff (it holds no permits meanwhile)."""
    now, now_params = db_later_sql(0)
    waited_out = Q(available_at__isnull=True) | Q(available_at__lte=RawSQL(now, now_params))
    startable = BatchJobItem.objects.filter(waited_out, batch=OuterRef("pk"), status=ItemStatus.PENDING)
    batches = BatchJob.objects.filter(
        Exists(startable),
        status__in=[BatchStatus.PENDING, BatchStatus.RUNNING],
        total_items__gt=F("running_items") + F("succeeded_items") + F("failed_items") + F("cancelled_items"),
    ).exclude(pk__in=list(exclude))
    if only is not None:
        batches = batches.filter(pk=only)
    return list(batches.order_by("created_at").values_list("id", "handler", "created_by_id")[:100])


def retries_waiting(*, only: uuid.UUID | None = None) -> bool:
    """Whether a pending or running batch has an item waiting out a retry's backoff."""
    waiting = BatchJobItem.objects.filter(
        status=ItemStatus.PENDING,
        available_at__isnull=False,
        batch__status__in=[BatchStatus.PENDING, BatchStatus.RUNNING],
    )
    return (waiting if only is None else waiting.filter(batch_id=only)).exists()


def batch_states(batch_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, BatchState]:
    drain = timedelta(seconds=settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS)
    rows = (
        BatchJob.objects.filter(pk__in=list(batch_ids))
        .annotate(
            force_due=Q(cancel_requested_at__lte=Now() - drain),
            deadline_due=RawSQL(db_deadline_passed_sql(), [], output_field=BooleanField()),
        )
        .values_list("id", "status", "max_parallel", "force_due", "deadline_due")
    )
    return {
        pk: BatchState(
            status=status,
            max_parallel=mp,
            force_due=bool(due),
            deadline_due=bool(overdue) and status in STOPPABLE,
        )
        for pk, status, mp, due, overdue in rows
    }


def pause_settled(batch: BatchJob) -> bool:
    """Nothing of the batch runs and nothing can start: no running item, and no worker holds
    a live permit of it (a worker records permits for whatever it may still run, including
    starts it has not written yet; by the database's clock)."""
    if batch.running_items:
        return False
    return not BatchPermit.objects.filter(batch_id=batch.pk, permits__gt=0, expires_at__gte=Now()).exists()


def batches_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[BatchJob]:
    """The batches `user` may see: all with `batch.view_batchjob`, else their own."""
    batches = BatchJob.objects.all()
    if not user.is_authenticated:
        return batches.none()
    if permissions.can_view_all(user):
        return batches
    return batches.filter(created_by_id=user.pk)


def batch_items(batch_id: uuid.UUID, *, status: str | None = None) -> QuerySet[BatchJobItem]:
    """Items of a batch in index order, optionally of one status (uses the (batch, index) index)."""
    items = BatchJobItem.objects.filter(batch_id=batch_id).order_by("index")
    return items if status is None else items.filter(status=status)


def batch_callbacks(batch_id: uuid.UUID) -> QuerySet[BatchCallback]:
    """A batch's completion webhook deliveries, oldest first (the body left out: it is the batch)."""
    return BatchCallback.objects.filter(batch_id=batch_id).defer("body").order_by("created_at", "id")


def item_count(batch: BatchJob, *, status: str | None = None) -> int:
    """How many items of `batch` have `status` (all without one), from its counters: no COUNT(*)."""
    counts: dict[str | None, int] = {
        None: batch.total_items,
        ItemStatus.PENDING: batch.pending_items,
        ItemStatus.RUNNING: batch.running_items,
        ItemStatus.SUCCEEDED: batch.succeeded_items,
        ItemStatus.FAILED: batch.failed_items,
        ItemStatus.CANCELLED: batch.cancelled_items,
    }
    return counts[status]


def counter_mismatches(batch: BatchJob) -> dict[str, tuple[int, int]]:
    """Counters that differ from the aggregate over the batch's items: {name: (stored, actual)}."""
    actual = {status: 0 for status in ItemStatus.values}
    for status, count in _status_counts(batch.pk):
        actual[status] = count
    stored = {
        "total_items": batch.total_items,
        "running_items": batch.running_items,
        "succeeded_items": batch.succeeded_items,
        "failed_items": batch.failed_items,
        "cancelled_items": batch.cancelled_items,
    }
    expected = {
        "total_items": sum(actual.values()),
        "running_items": actual[ItemStatus.RUNNING],
        "succeeded_items": actual[ItemStatus.SUCCEEDED],
        "failed_items": actual[ItemStatus.FAILED],
        "cancelled_items": actual[ItemStatus.CANCELLED],
    }
    return {name: (stored[name], expected[name]) for name in stored if stored[name] != expected[name]}


def _status_counts(batch_id: uuid.UUID) -> list[tuple[str, int]]:
    return list(
        BatchJobItem.objects.filter(batch_id=batch_id)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )


@dataclass(frozen=True)
class ProgressRow:
    id: uuid.UUID
    label: str
    status: str
    total: int
    running: int
    succeeded: int
    failed: int
    cancelled: int

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def terminal(self) -> bool:
        return self.status in (BatchStatus.SUCCEEDED, BatchStatus.FAILED, BatchStatus.CANCELLED)


def progress_rows(batch_ids: Iterable[uuid.UUID]) -> list[ProgressRow]:
    rows = BatchJob.objects.filter(pk__in=list(batch_ids)).order_by("created_at")
    return [
        ProgressRow(
            id=b.id,
            label=b.name or b.handler,
            status=b.status,
            total=b.total_items,
            running=b.running_items,
            succeeded=b.succeeded_items,
            failed=b.failed_items,
            cancelled=b.cancelled_items,
        )
        for b in rows
    ]


EXPORT_FIELDS = ("index", "source_index", "status", "attempts", "params", "result", "error")


def export_chunk(batch_id: uuid.UUID, *, after: int, limit: int) -> list[tuple[Any, ...]]:
    """The next `limit` items after index `after` as `EXPORT_FIELDS` tuples (keyset pagination on
    the unique (batch, index) index: each chunk is one short query, no cursor held between them)."""
    items = BatchJobItem.objects.filter(batch_id=batch_id, index__gt=after).order_by("index")
    return list(items.values_list(*EXPORT_FIELDS)[:limit])


@dataclass(frozen=True)
class JsonKeys:
    """Top-level keys of one JSON column over a batch's items: at most `limit` of them (code-point
    order, each at most `max_length` characters); `overflow` when some value is not an object or a
    key did not fit (too many, or too long)."""

    keys: tuple[str, ...]
    overflow: bool


# Per database: the keys of a JSON column, one row per (item, key), and one row with a NULL key
# for an item whose value is neither an object nor null (LEFT JOIN of a key function that gives no
# rows for a NULL argument); the key as text in code-point order (PostgreSQL's "C" collation;
# SQLite's BINARY compares UTF-8 bytes, the same order; bytes: a lone surrogate would not decode).
_KEY_SQL = {
    "postgresql": (
        "jsonb_typeof",
        "LEFT JOIN LATERAL jsonb_object_keys(CASE WHEN jsonb_typeof(i.{col}) = 'object' THEN i.{col} END)"
        " AS j(key) ON true",
        'j.key COLLATE "C"',
    ),
    "sqlite": (
        "json_type",
        "LEFT JOIN json_each(CASE WHEN json_type(i.{col}) = 'object' THEN i.{col} END) AS j ON true",
        "CAST(j.key AS BLOB)",
    ),
}
_KEYS = """SELECT DISTINCT CASE WHEN j.key IS NULL OR length(j.key) > %s THEN NULL ELSE {key} END
FROM batch_job_item i {join}
WHERE i.batch_id = %s AND (j.key IS NOT NULL OR {typeof}(i.{col}) NOT IN ('object', 'null'))
ORDER BY 1 NULLS FIRST LIMIT %s"""


def json_keys(batch_id: uuid.UUID, column: str, *, limit: int, max_length: int) -> JsonKeys:
    """The keys of `column` ("params" or "result") over the batch's items, found by the database
    in one scan (at most `limit` + 2 rows come back), so that a CSV header is known before the
    first row. NULL, sorted first, stands for "a value or key without a column of its own"."""
    if column not in ("params", "result"):
        raise ValueError(f"not a JSON column of items: {column!r}")
    typeof, join, key = _KEY_SQL[connection.vendor]
    sql = _KEYS.format(key=key, join=join.format(col=column), typeof=typeof, col=column)
    with connection.cursor() as cursor:
        cursor.execute(sql, [max_length, db_uuid(batch_id), limit + 2])
        found = [row[0] for row in cursor.fetchall()]
    overflow = bool(found) and found[0] is None
    keys = tuple(_text(k) for k in found[overflow:])
    return JsonKeys(keys=keys[:limit], overflow=overflow or len(keys) > limit)


def _text(key: str | bytes) -> str:
    # SQLite returns a lone surrogate's escape as CESU-8 bytes; surrogatepass gives the str json.loads gives.
    return key.decode("utf-8", "surrogatepass") if isinstance(key, bytes) else key
