"""What the service modules share: results and errors, the batch-row lock, finalizing, notifying, auditing."""

from __future__ import annotations

import enum
import itertools
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import connection, transaction

from batch.models import (
    AuditAction,
    BatchAuditEvent,
    BatchJob,
    BatchStatus,
    ItemStatus,
    StatusReason,
)
from batch.signals import batch_changed

logger = logging.getLogger(__name__)


MAX_PARALLEL_LIMIT = 10_000


CONTROL_CHANNEL = "batch_control"


Actor = AbstractBaseUser | AnonymousUser | None


def as_user(actor: Actor) -> User | None:
    """The user to record for `actor`; None for anonymous or system (command, worker) calls."""
    if actor is None or not actor.is_authenticated:
        return None
    return cast(User, actor)


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
    max_attempts: int = 1  # the batch's: a failed attempt below it may be retried (handler's `Retry`)


@dataclass(frozen=True)
class Start:
    """A held item this worker started (without a round trip), and when; written after the fact."""

    item_id: int
    started_at: datetime = field(default_factory=partial(datetime.now, UTC))


@dataclass(frozen=True)
class StepResult:
    """What one step of a worker on a batch got back."""

    fetched: list[ClaimedItem]  # pending items now held for this worker (leased, not started)
    status: str | None  # the batch's status after the step; None if the step did not read it
    refused: list[int] = field(default_factory=list)  # starts the database did not accept (lease lost)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended. A failed attempt to be tried again is `PENDING` with `retry_in`:
    the item waits that many seconds (by the database's clock), holding no slot."""

    item_id: int
    status: ItemStatus
    result: Any = None
    error: str = ""
    finished_at: datetime = field(default_factory=partial(datetime.now, UTC))
    retry_in: float | None = None
    # The attempt this is the outcome of (None: not known): a retried step cannot apply it to a
    # later attempt of the same item.
    attempt: int | None = None


@dataclass
class Step:
    """One write of a worker about one batch (see `execution.run_step`): the starts and outcomes
    of its items, held items it gives back, and how many more pending items it wants to hold."""

    started: list[Start] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    give_back: list[int] = field(default_factory=list)
    fetch: int = 0


def chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def lock_batch(batch_id: uuid.UUID) -> BatchJob:
    """The batch row, locked until the transaction ends. Raises BatchJob.DoesNotExist."""
    return BatchJob.objects.select_for_update().get(pk=batch_id)


# Statuses a stop (cancel, deadline, failure threshold) applies to.
STOPPABLE = (BatchStatus.PENDING, BatchStatus.RUNNING, BatchStatus.PAUSED)


def stopped_status(reason: str | None) -> BatchStatus:
    """The terminal status of a stopped batch once nothing of it runs: `failed` at its failure
    threshold, `cancelled` otherwise."""
    return BatchStatus.FAILED if reason == StatusReason.FAILURE_THRESHOLD else BatchStatus.CANCELLED


def finalize_if_done(batch: BatchJob, now: datetime) -> None:
    """Move a locked batch whose items have all stopped to its terminal status (the caller saves
    it; its outbox row and `batch_finished` go with that transaction: `callbacks.record_finish`)."""
    if batch.running_items or batch.pending_items or batch.is_terminal:
        return
    if batch.status == BatchStatus.CANCELLING:
        batch.status = stopped_status(batch.status_reason)
    elif batch.failed_items or batch.cancelled_items:
        batch.status = BatchStatus.FAILED
    else:
        batch.status = BatchStatus.SUCCEEDED
    batch.finished_at = now
    logger.info(
        "batch finished",
        extra={"batch_id": str(batch.id), "status": batch.status, "total": batch.total_items},
    )
    from batch.services.callbacks import record_finish  # it imports this module

    record_finish(batch_id=batch.id, status=batch.status, callback_url=batch.callback_url, batch=batch)


COUNTER_FIELDS = [
    "status",
    "running_items",
    "succeeded_items",
    "failed_items",
    "cancelled_items",
    "started_at",
    "finished_at",
    "updated_at",
]


def save_counters(batch: BatchJob) -> None:
    batch.save(update_fields=COUNTER_FIELDS)


def notify(batch_id: uuid.UUID, kind: str, item_ids: Sequence[int] = (), *, wake: bool = True) -> None:
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


def audit(batch_id: uuid.UUID, action: AuditAction, actor: Actor, at: datetime, **details: Any) -> None:
    """Record who did what to a batch; called inside the transaction of the change."""
    user = as_user(actor)
    name = user.get_username() if user else ""
    BatchAuditEvent.objects.create(
        batch_id=batch_id, action=action, actor=user, actor_name=name, at=at, details=details
    )


def effective_parallel(max_parallel: int) -> int:
    return min(max_parallel, settings.BATCH_GLOBAL_MAX_PARALLEL)


def apply_finished(batch: BatchJob, statuses: Iterable[str]) -> None:
    for status in statuses:
        batch.running_items -= 1
        if status == ItemStatus.SUCCEEDED:
            batch.succeeded_items += 1
        elif status == ItemStatus.FAILED:
            batch.failed_items += 1
        else:
            batch.cancelled_items += 1


# --- the database's clock: every lease, recovery, deadline and expiry is judged by it -------


def db_uuid(value: uuid.UUID) -> Any:
    """A batch id as the database stores it (hex on SQLite), for raw SQL."""
    return BatchJob._meta.pk.get_db_prep_value(value, connection)


def sql_marks(values: Sequence[Any]) -> str:
    return ", ".join(["%s"] * len(values))


def db_now() -> datetime:
    """The database's current time (hosts' clocks disagree; the database's is the one clock)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT clock_timestamp()")
            value: datetime = cursor.fetchone()[0]
            return value
        cursor.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
        return datetime.fromisoformat(cursor.fetchone()[0]).replace(tzinfo=UTC)


def db_later_sql(seconds: float) -> tuple[str, list[Any]]:
    """SQL for the database's time `seconds` from now, and its parameters."""
    if connection.vendor == "postgresql":
        return "clock_timestamp() + %s * interval '1 second'", [float(seconds)]
    return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', %s)", [f"{float(seconds):+.6f} seconds"]


def db_statement_now_sql() -> str:
    """SQL (no parameters) for the database's time, the same wherever it occurs in one statement."""
    if connection.vendor == "postgresql":
        return "statement_timestamp()"
    return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"


def db_later_column_sql(column: str) -> str:
    """SQL for the database's time `column` (a number of seconds, in the same statement) from now."""
    if connection.vendor == "postgresql":
        return f"clock_timestamp() + {column} * interval '1 second'"
    return f"strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', printf('%%+.6f seconds', {column}))"


def db_deadline_passed_sql() -> str:
    """SQL (no parameters) true for a `batch_job` row whose `deadline_seconds` since `started_at`
    have passed by the database's clock; one rule, written for each database."""
    if connection.vendor == "postgresql":
        return (
            "(batch_job.deadline_seconds IS NOT NULL AND batch_job.started_at IS NOT NULL"
            " AND batch_job.started_at + batch_job.deadline_seconds * interval '1 second' <= now())"
        )
    return (
        "(batch_job.deadline_seconds IS NOT NULL AND batch_job.started_at IS NOT NULL"
        " AND (julianday('now') - julianday(batch_job.started_at)) * 86400.0 >= batch_job.deadline_seconds)"
    )
