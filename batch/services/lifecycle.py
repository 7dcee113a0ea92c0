"""Pause and resume: a paused batch gets no slot permits, so no worker starts its items.

Pausing acts through the cap rule (`permits.py`): the database grants a batch permits only
while it is pending or running, so a paused batch's next grant on every worker is 0. Each
worker then starts nothing more, gives its held items back (still pending) and lets its running
items finish; its recorded permits fall to what still runs there. A pause has settled
(`selectors.pause_settled`) once no item runs and no worker holds a permit of the batch.
"""

from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass

from django.db import transaction

from batch.models import AuditAction, BatchJob, BatchStatus
from batch.services._base import Actor, audit, db_now, lock_batch, notify

logger = logging.getLogger(__name__)

PAUSABLE = (BatchStatus.PENDING, BatchStatus.RUNNING)


class Transition(enum.Enum):
    APPLIED = "applied"
    REFUSED = "refused"  # the batch's status does not allow it (the caller answers 409)
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class TransitionResult:
    outcome: Transition
    batch: BatchJob | None  # as it is after the call (None: not found)


def pause_batch(*, batch_id: uuid.UUID, by: Actor = None) -> TransitionResult:
    """A pending or running batch → paused: workers start nothing more of it (0 permits),
    running items finish. Refused for a paused, cancelling or finished batch."""
    with transaction.atomic():
        try:
            batch = lock_batch(batch_id)
        except BatchJob.DoesNotExist:
            return TransitionResult(Transition.NOT_FOUND, None)
        if batch.status not in PAUSABLE:
            return TransitionResult(Transition.REFUSED, batch)
        now = db_now()
        audit(batch_id, AuditAction.PAUSE_REQUESTED, by, now, status=batch.status, running=batch.running_items)
        batch.status = BatchStatus.PAUSED
        batch.save(update_fields=["status", "updated_at"])
        notify(batch_id, "pause")  # workers sync their permits now (else at their next poll)
    logger.info("batch paused", extra={"batch_id": str(batch_id)})
    return TransitionResult(Transition.APPLIED, batch)


def resume_batch(*, batch_id: uuid.UUID, by: Actor = None) -> TransitionResult:
    """A paused batch → running (pending if no item of it ever started). Refused otherwise."""
    with transaction.atomic():
        try:
            batch = lock_batch(batch_id)
        except BatchJob.DoesNotExist:
            return TransitionResult(Transition.NOT_FOUND, None)
        if batch.status != BatchStatus.PAUSED:
            return TransitionResult(Transition.REFUSED, batch)
        batch.status = BatchStatus.RUNNING if batch.started_at is not None else BatchStatus.PENDING
        audit(batch_id, AuditAction.RESUMED, by, db_now(), status=batch.status)
        batch.save(update_fields=["status", "updated_at"])
        notify(batch_id, "resume")  # workers take permits again; idle ones pick the batch up
    logger.info("batch resumed", extra={"batch_id": str(batch_id), "status": batch.status})
    return TransitionResult(Transition.APPLIED, batch)
