"""Slot permits: the one place a batch's cap is enforced.

The cap rule: a worker starts an item of a batch only while it runs fewer of the batch's items
than the permits the database last granted it, and the database grants permits only while the
permits held by all workers fit within the batch's `effective_parallel` (checked here, under the
batch-row lock). Permits are leased (by the database's clock): a worker that stops renewing
loses them. Resize, pause, cancel and sharing between workers all act through the next grant:
the cap is 0 unless the batch is pending or running (a paused, cancelling or finished batch
gets no permits, so every worker starts nothing more of it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Sum

from batch.models import BatchJob, BatchPermit, BatchStatus
from batch.services._base import CONTROL_CHANNEL, db_now, lock_batch, notify

GRANTING = (BatchStatus.PENDING, BatchStatus.RUNNING)  # the statuses whose batches get permits


@dataclass(frozen=True)
class PermitRequest:
    batch_id: uuid.UUID
    holding: int  # what may run on this worker until the answer arrives: max(running, capacity)
    demand: int  # how many of the batch's items it could run (0: it wants no more)


@dataclass(frozen=True)
class Grant:
    batch_id: uuid.UUID
    allowed: int  # how many of the batch's items the worker may run from now on
    permits: int  # what the database records for it: max(holding, allowed)
    status: str | None  # None: the batch no longer exists


def fair_shares(cap: int, wants: Mapping[str, tuple[int, datetime | None]]) -> dict[str, int]:
    """Divide `cap` among workers by their (demand, waiting_since): nobody gets more than it
    wants, the rest is split evenly, and permits that do not divide go to the longest waiting."""
    shares = dict.fromkeys(wants, 0)
    left = cap
    hungry = sorted((w for w, (demand, _) in wants.items() if demand > 0), key=lambda w: wants[w][0])
    while hungry and left > 0:
        each, extra = divmod(left, len(hungry))
        smallest = hungry[0]
        if wants[smallest][0] <= each:
            shares[smallest] = wants[smallest][0]
            left -= shares[smallest]
            hungry.pop(0)
            continue
        queue = sorted(hungry, key=lambda w: (0, since, w) if (since := wants[w][1]) else (1, w))
        for rank, worker in enumerate(queue):
            shares[worker] = each + (1 if rank < extra else 0)
        break
    return shares


def sync_permits(*, worker_id: str, lease_seconds: float, requests: Sequence[PermitRequest]) -> dict[uuid.UUID, Grant]:
    """Renew `worker_id`'s permits of each batch and move them toward its fair share."""
    return {request.batch_id: _sync_one(worker_id, lease_seconds, request) for request in requests}


def release_permits(*, worker_id: str, batch_id: uuid.UUID) -> None:
    """The worker runs nothing of the batch any more: its permits go back at once."""
    BatchPermit.objects.filter(batch_id=batch_id, worker_id=worker_id).delete()


def _sync_one(worker_id: str, lease_seconds: float, request: PermitRequest) -> Grant:
    with transaction.atomic():
        try:
            batch = lock_batch(request.batch_id)
        except BatchJob.DoesNotExist:
            return Grant(request.batch_id, allowed=0, permits=0, status=None)
        now = db_now()
        holders = BatchPermit.objects.filter(batch=batch)
        holders.filter(expires_at__lt=now).delete()
        rows = {row.worker_id: row for row in holders}
        mine = rows.pop(worker_id, None)
        cap = batch.effective_parallel if batch.status in GRANTING else 0
        room = cap - sum(row.permits for row in rows.values())
        if settings.BATCH_MAX_RUNNING_PER_OWNER and batch.created_by_id is not None:
            room = min(room, _owner_room(batch, now, in_batch=cap - room))
        waiting = mine.waiting_since if mine is not None else None
        wants = {w: (row.demand, row.waiting_since) for w, row in rows.items()}
        wants[worker_id] = (request.demand, waiting or now)
        allowed = max(0, min(request.demand, fair_shares(cap, wants)[worker_id], room))
        permits = max(request.holding, allowed)
        if allowed < request.demand and waiting is None and rows:
            _ask_holders(batch.pk)  # it starts waiting: the holders sync now, not at their heartbeat
        if batch.status == BatchStatus.PAUSED and mine is not None and mine.permits > permits:
            notify(batch.pk, "paused-permits")  # a waiting pause request may be done now
        if permits == 0 and request.demand == 0:
            if mine is not None:
                mine.delete()
        else:
            BatchPermit.objects.update_or_create(
                batch=batch,
                worker_id=worker_id,
                defaults={
                    "permits": permits,
                    "demand": request.demand,
                    "waiting_since": None if allowed >= request.demand else (waiting or now),
                    "expires_at": now + timedelta(seconds=lease_seconds),
                },
            )
    return Grant(request.batch_id, allowed=allowed, permits=permits, status=batch.status)


def _owner_room(batch: BatchJob, now: datetime, *, in_batch: int) -> int:
    """Permits the batch's owner may still take under BATCH_MAX_RUNNING_PER_OWNER (which caps
    one owner's running items cluster-wide). The owner's row is locked: its grants queue."""
    get_user_model().objects.select_for_update().filter(pk=batch.created_by_id or 0).exists()
    elsewhere = (
        BatchPermit.objects.filter(batch__created_by_id=batch.created_by_id, expires_at__gte=now)
        .exclude(batch=batch)
        .aggregate(n=Sum("permits"))["n"]
        or 0
    )
    return int(settings.BATCH_MAX_RUNNING_PER_OWNER) - elsewhere - in_batch


def _ask_holders(batch_id: uuid.UUID) -> None:
    """Wake the other workers of the batch (PostgreSQL; elsewhere they sync on their heartbeat)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CONTROL_CHANNEL, f"permits:{batch_id}"])
