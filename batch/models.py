"""Batch jobs and their items. State changes go through `batch.services` only."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class BatchStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    CANCELLING = "cancelling", "Cancelling"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_BATCH_STATUSES = (BatchStatus.PENDING, BatchStatus.RUNNING, BatchStatus.PAUSED, BatchStatus.CANCELLING)
TERMINAL_BATCH_STATUSES = (BatchStatus.SUCCEEDED, BatchStatus.FAILED, BatchStatus.CANCELLED)


class StatusReason(models.TextChoices):
    """Why a batch was stopped (cancelled, or failed at its failure threshold)."""

    REQUESTED = "requested", "Requested"  # by a user or a command (the actor is in the audit trail)
    DEADLINE = "deadline", "Deadline"
    FAILURE_THRESHOLD = "failure threshold", "Failure threshold"


class ItemStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class BatchJob(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200, blank=True, default="")
    handler = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.PENDING)
    max_parallel = models.PositiveIntegerField(default=4)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    # Stop the batch (like a cancel, then `failed`) once this many items have failed; None: never.
    max_failures = models.PositiveIntegerField(null=True, blank=True)
    # Cancel the batch this long after it started (by the database's clock); None: no deadline.
    deadline_seconds = models.PositiveIntegerField(null=True, blank=True)
    status_reason = models.CharField(  # noqa: DJ001 - NULL: not stopped; the contract's null
        max_length=32, choices=StatusReason.choices, null=True, blank=True
    )
    total_items = models.PositiveIntegerField(default=0)
    running_items = models.PositiveIntegerField(default=0)
    succeeded_items = models.PositiveIntegerField(default=0)
    failed_items = models.PositiveIntegerField(default=0)
    cancelled_items = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="batch_jobs",
    )
    cancel_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    # The batch whose failed (or cancelled) items this one runs again; None: a fresh submit.
    retry_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries")
    # POSTed once the batch ends (see `batch.services.callbacks`); "": none.
    callback_url = models.URLField(max_length=2000, blank=True, default="")
    # NULL, not "": batches without a key must not collide in the unique constraint.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001

    class Meta:
        db_table = "batch_job"
        ordering = ["-created_at"]
        verbose_name = "batch"
        verbose_name_plural = "batches"
        permissions = [
            ("cancel_batchjob", "Can cancel batch"),
            ("resize_batchjob", "Can resize batch"),
            ("pause_batchjob", "Can pause and resume batch"),
            ("retry_batchjob", "Can retry batch"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=BatchStatus.values), name="batch_job_status_valid"),
            models.CheckConstraint(condition=Q(max_parallel__gte=1), name="batch_job_max_parallel_gte_1"),
            models.CheckConstraint(condition=Q(max_attempts__gte=1), name="batch_job_max_attempts_gte_1"),
            models.CheckConstraint(
                condition=Q(max_failures__isnull=True) | Q(max_failures__gte=1), name="batch_job_max_failures_gte_1"
            ),
            models.CheckConstraint(
                condition=Q(deadline_seconds__isnull=True) | Q(deadline_seconds__gte=1),
                name="batch_job_deadline_seconds_gte_1",
            ),
            models.CheckConstraint(
                condition=Q(
                    total_items__gte=F("running_items")
                    + F("succeeded_items")
                    + F("failed_items")
                    + F("cancelled_items")
                ),
                name="batch_job_counters_within_total",
            ),
            models.UniqueConstraint(
                fields=["created_by", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="batch_job_idempotency_key_unique",
            ),
        ]
        indexes = [
            models.Index(
                fields=["created_at"],
                condition=Q(status__in=["pending", "running", "paused", "cancelling"]),
                name="batch_job_active_idx",
            ),
            models.Index(fields=["status", "-created_at"], name="batch_job_status_idx"),
        ]

    def __str__(self) -> str:
        return self.name or f"{self.handler} {self.id}"

    @property
    def pending_items(self) -> int:
        return self.total_items - self.running_items - self.finished_items

    @property
    def finished_items(self) -> int:
        return self.succeeded_items + self.failed_items + self.cancelled_items

    @property
    def effective_parallel(self) -> int:
        return min(self.max_parallel, settings.BATCH_GLOBAL_MAX_PARALLEL)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_BATCH_STATUSES


class BatchJobItem(models.Model):
    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique (batch, index) constraint leads with it, and one index
    # less is one write less on every claim, reservation and completion.
    batch = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="items", db_index=False)
    index = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=ItemStatus.choices, default=ItemStatus.PENDING)
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveSmallIntegerField(default=0)
    source_index = models.PositiveIntegerField(null=True, blank=True)  # its `index` in the batch retried
    # A pending item waiting out a retry's backoff starts no earlier (the database's clock); NULL: now.
    available_at = models.DateTimeField(null=True, blank=True)
    # The last few failed attempts: [{"attempt": n, "error": "...", "at": iso time}, ...], oldest first.
    errors = models.JSONField(default=list, blank=True)
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "batch_job_item"
        ordering = ["batch_id", "index"]
        verbose_name = "batch item"
        constraints = [
            models.UniqueConstraint(fields=["batch", "index"], name="batch_job_item_batch_index_unique"),
            models.CheckConstraint(condition=Q(status__in=ItemStatus.values), name="batch_job_item_status_valid"),
        ]
        indexes = [
            # The claim query: next pending items of a batch in index order. Partial, so it
            # stays small however many finished items the table holds.
            models.Index(
                fields=["batch", "index"],
                condition=Q(status="pending"),
                name="batch_item_pending_idx",
            ),
            # Lease recovery: running items and reservations (pending items leased to a
            # worker) carry a lease; nothing else does. Renewal goes by primary key. Every
            # index here is written on each state change, so there are as few as the queries need.
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(lease_expires_at__isnull=False),
                name="batch_item_lease_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.batch_id}#{self.index}"


class BatchPermit(models.Model):
    """Slot permits of one batch held by one worker, under a lease (judged by the database's
    clock). The permits of all holders of a batch never exceed its `effective_parallel`; a
    worker runs at most `permits` of the batch's items. `demand` is how many it could use."""

    id = models.BigAutoField(primary_key=True)
    batch = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="permits")
    worker_id = models.CharField(max_length=200)
    permits = models.PositiveIntegerField(default=0)
    demand = models.PositiveIntegerField(default=0)
    # Since when it has wanted more than it holds (None: it holds what it wants); the
    # longest-waiting worker is first in line for the permits that do not divide evenly.
    waiting_since = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "batch_permit"
        constraints = [models.UniqueConstraint(fields=["batch", "worker_id"], name="batch_permit_batch_worker_unique")]

    def __str__(self) -> str:
        return f"{self.batch_id}: {self.permits} for {self.worker_id}"


class CallbackStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"  # gave up after BATCH_CALLBACK_RETRY_SECONDS, or not allowed


class BatchCallback(models.Model):
    """The outbox of completion webhooks: one row per finished batch that names a
    `callback_url`, written in the transaction of its final state and delivered (at least once)
    by a worker. `body` is the JSON exactly as sent and signed."""

    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique constraint on `batch` is one.
    batch = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="callbacks", db_index=False)
    url = models.URLField(max_length=2000)
    body = models.TextField()
    status = models.CharField(max_length=16, choices=CallbackStatus.choices, default=CallbackStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    next_attempt_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    # A delivery in flight: the worker sending it, until when (then another may take it).
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "batch_callback"
        ordering = ["created_at", "id"]
        verbose_name = "callback delivery"
        verbose_name_plural = "callback deliveries"
        # One per batch: a batch reaches its terminal status once (and a second write would fail loudly).
        constraints = [models.UniqueConstraint(fields=["batch"], name="batch_callback_batch_unique")]
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="batch_callback_due_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.batch_id} → {self.url} ({self.status})"


class BatchWorker(models.Model):
    """One `runbatch` process; its heartbeat tells the others (and health checks) it is alive."""

    id = models.CharField(primary_key=True, max_length=200)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    concurrency = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "batch_worker"
        ordering = ["-heartbeat_at"]

    def __str__(self) -> str:
        return self.id


class AuditAction(models.TextChoices):
    SUBMITTED = "submitted", "Submitted"
    CANCEL_REQUESTED = "cancel_requested", "Cancel requested"
    RESIZED = "resized", "Resized"
    PAUSE_REQUESTED = "pause_requested", "Pause requested"
    RESUMED = "resumed", "Resumed"
    RETRIED = "retried", "Retried"


class BatchAuditEvent(models.Model):
    """Who submitted, cancelled or resized a batch, and when; written by `batch.services` in
    the transaction of the change itself. `actor_name` survives the user's deletion."""

    id = models.BigAutoField(primary_key=True)
    batch = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="audit_events")
    action = models.CharField(max_length=32, choices=AuditAction.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_name = models.CharField(max_length=150, blank=True, default="")
    at = models.DateTimeField()
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "batch_audit_event"
        ordering = ["at", "id"]
        verbose_name = "audit event"
        indexes = [models.Index(fields=["batch", "at"], name="batch_audit_batch_at_idx")]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor_name or 'system'} at {self.at:%Y-%m-%d %H:%M:%S}"
