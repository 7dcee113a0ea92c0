"""Completion webhooks and hooks: which URLs may be called, the outbox, and its deliveries' state.

When a batch reaches its terminal status (`execution._apply_counters` or `_base.finalize_if_done`,
both inside the transaction of that change, the batch row locked) `record_finish` registers
`batch_finished` for the commit and, if the batch names a `callback_url`, writes its one
`BatchCallback` row: the outbox. Workers claim due rows (`claim_due`, leased, `SKIP LOCKED`),
POST them (`batch.callbacks_delivery`) and write each attempt's result (`record_attempt`).
Every time here is the database's.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from batch.limits import string_problem
from batch.models import BatchCallback, BatchJob, CallbackStatus
from batch.services._base import db_now
from batch.signals import batch_finished

logger = logging.getLogger(__name__)

MAX_CALLBACK_URL_LENGTH = 2000
MAX_BACKOFF_SECONDS = 600.0
MAX_ERROR_CHARS = 1000
DEFAULT_PORTS = {"http": 80, "https": 443}
ATTEMPT_FIELDS = [
    *("attempts", "last_status_code", "last_error", "lease_owner", "lease_expires_at"),
    *("status", "delivered_at", "next_attempt_at"),
]


# --- which URLs may be called ---------------------------------------------------------------


def callback_url_problem(url: str) -> str | None:
    """Why `url` may not be a batch's callback_url, or None: http(s), no user info, at most
    2000 characters, and its host (and port) in BATCH_CALLBACK_ALLOWED_HOSTS."""
    if len(url) > MAX_CALLBACK_URL_LENGTH:
        return f"At most {MAX_CALLBACK_URL_LENGTH} characters; got {len(url)}."
    if (problem := string_problem(url)) is not None:
        return problem
    if any(char.isspace() or not char.isprintable() for char in url):
        return "Must not contain spaces or control characters."
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "Enter a valid URL."
    if parts.scheme not in DEFAULT_PORTS:
        return "Only http and https URLs may be called back."
    if "@" in parts.netloc:
        return "Must not contain a user name or password."
    if not parts.hostname:
        return "Enter a valid URL."
    if not host_allowed(url):
        host = parts.hostname if port is None else f"{parts.hostname}:{port}"
        return f"The host {host!r} is not in BATCH_CALLBACK_ALLOWED_HOSTS."
    return None


def host_allowed(url: str) -> bool:
    """True if the URL's host is allowed now: an entry `host` allows it on any port, `host:port`
    on that port only (`[v6]:port` for IPv6). Exact, case-insensitive names; no wildcards."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    for entry in settings.BATCH_CALLBACK_ALLOWED_HOSTS:
        allowed_host, allowed_port = _split_host_entry(entry)
        if host and allowed_host == host and allowed_port in (None, port):
            return True
    return False


def _split_host_entry(entry: str) -> tuple[str, int | None]:
    text = entry.strip().lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    name, colon, port = text.rpartition(":")
    if colon and ":" not in name and port.isdigit():
        return name, int(port)
    return text, None


# --- the outbox: written with the final state ----------------------------------------------


def record_finish(*, batch_id: uuid.UUID, status: str, callback_url: str, batch: BatchJob | None = None) -> None:
    """The batch (its row locked, in this transaction) has just reached its terminal `status`:
    `batch_finished` fires on commit, and a batch naming a callback_url gets its outbox row
    now. `batch` is the in-memory row with the final state when the caller has it (it saves
    it after); otherwise it is read back."""
    transaction.on_commit(partial(_send_finished, batch_id, status))
    if not callback_url:
        return
    if batch is None:
        batch = BatchJob.objects.select_related("created_by").get(pk=batch_id)
    now = db_now()
    BatchCallback.objects.create(
        batch_id=batch_id, url=callback_url, body=render_body(batch), created_at=now, next_attempt_at=now
    )


def render_body(batch: BatchJob) -> str:
    """The batch as the API renders it (relative URLs), as ASCII JSON: exactly what is sent and signed."""
    from rest_framework.utils.encoders import JSONEncoder

    from batch.api.serializers import BatchSerializer  # the API's package imports the services

    data = BatchSerializer(batch, context={"request": None}).data
    return json.dumps(data, cls=JSONEncoder, separators=(",", ":"), ensure_ascii=True)


def _send_finished(batch_id: uuid.UUID, status: str) -> None:
    for receiver, response in batch_finished.send_robust(BatchJob, batch_id=batch_id, status=status):
        if isinstance(response, Exception):
            logger.error(
                "a batch_finished receiver failed",
                exc_info=response,
                extra={"batch_id": str(batch_id), "receiver": getattr(receiver, "__qualname__", str(receiver))},
            )


# --- deliveries: claimed under a lease, each attempt recorded -------------------------------


@dataclass(frozen=True)
class DueCallback:
    id: int
    batch_id: uuid.UUID
    url: str
    body: str
    attempts: int  # before this one


def claim_due(*, worker_id: str, limit: int, lease_seconds: float) -> list[DueCallback]:
    """Up to `limit` pending deliveries due by the database's clock and leased to nobody (or
    to a worker whose lease ran out) → leased to `worker_id`, oldest due first."""
    with transaction.atomic():
        now = db_now()
        free = Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lte=now)
        due = (
            BatchCallback.objects.select_for_update(skip_locked=True)
            .filter(free, status=CallbackStatus.PENDING, next_attempt_at__lte=now)
            .order_by("next_attempt_at", "id")
            .values_list("id", "batch_id", "url", "body", "attempts")[:limit]
        )
        rows = [DueCallback(*row) for row in due]
        if rows:
            BatchCallback.objects.filter(pk__in=[row.id for row in rows]).update(
                lease_owner=worker_id, lease_expires_at=now + timedelta(seconds=lease_seconds)
            )
    return rows


@dataclass(frozen=True)
class Attempt:
    """What one POST got: a status code (None: no response) and an error ("" for a 2xx)."""

    status_code: int | None
    error: str = ""
    retry: bool = True  # False: never try again (the host is no longer allowed)

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300 and not self.error


@dataclass(frozen=True)
class Recorded:
    status: str  # of the delivery after the attempt
    attempts: int
    retry_in: float | None  # seconds until the next attempt is due, when one is


def record_attempt(*, callback_id: int, worker_id: str, attempt: Attempt) -> Recorded | None:
    """Write an attempt of a delivery leased to `worker_id`: delivered on a 2xx; else pending
    again after a backoff, or failed when that would pass created_at + BATCH_CALLBACK_RETRY_SECONDS.
    None if the lease was lost meanwhile (the row's new holder sends and records it)."""
    with transaction.atomic():
        row = (
            BatchCallback.objects.select_for_update()
            .filter(pk=callback_id, status=CallbackStatus.PENDING, lease_owner=worker_id)
            .first()
        )
        if row is None:
            return None
        now = db_now()
        row.attempts += 1
        row.last_status_code, row.last_error = attempt.status_code, attempt.error[:MAX_ERROR_CHARS]
        row.lease_owner, row.lease_expires_at = "", None
        delay = backoff_seconds(row.attempts)
        retry_at, retry_in = now + timedelta(seconds=delay), None
        give_up_at = row.created_at + timedelta(seconds=settings.BATCH_CALLBACK_RETRY_SECONDS)
        if attempt.delivered:
            row.status, row.delivered_at = CallbackStatus.DELIVERED, now
        elif not attempt.retry or retry_at > give_up_at:
            row.status = CallbackStatus.FAILED
        else:
            row.next_attempt_at, retry_in = retry_at, delay
        row.save(update_fields=ATTEMPT_FIELDS)
    _log_attempt(row)
    return Recorded(status=row.status, attempts=row.attempts, retry_in=retry_in)


def backoff_seconds(attempts: int) -> float:
    """Delay after the `attempts`-th failed attempt: exponential from BATCH_CALLBACK_BACKOFF_SECONDS,
    at most MAX_BACKOFF_SECONDS, with jitter (half fixed, half random: never 0, never in step)."""
    base = float(settings.BATCH_CALLBACK_BACKOFF_SECONDS)
    cap = min(base * 2.0 ** min(attempts - 1, 30), MAX_BACKOFF_SECONDS)
    return cap / 2 + random.uniform(0, cap / 2)


def _log_attempt(row: BatchCallback) -> None:
    extra: dict[str, Any] = {
        "batch_id": str(row.batch_id),
        "callback_id": row.id,
        "attempts": row.attempts,
        "status_code": row.last_status_code,
        "status": row.status,
    }
    if row.status == CallbackStatus.DELIVERED:
        logger.info("webhook delivered", extra=extra)
    elif row.status == CallbackStatus.FAILED:
        logger.error("webhook failed; giving up: %s", row.last_error, extra=extra)
    else:
        logger.warning("webhook attempt failed; retrying: %s", row.last_error, extra=extra)
