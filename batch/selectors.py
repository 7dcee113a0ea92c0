"""Reads: what the worker, the API and the admin look up. No writes here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import BooleanField, Count, Exists, F, OuterRef, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

from batch import permissions
from batch.models import BatchCallback, BatchJob, BatchJobItem, BatchPermit, BatchStatus, ItemStatus
from batch.services._base import STOPPABLE, db_deadline_passed_sql, db_later_sql


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
