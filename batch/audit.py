"""Reading the audit trail (written by `batch.services`): the selector and the admin's view of it."""

from __future__ import annotations

import json
import uuid

from django.contrib import admin
from django.db.models import QuerySet
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from batch.models import BatchAuditEvent, BatchJob

ADMIN_EVENTS = 50  # a batch page shows the latest ones; the API pages through all


def events_of(batch_id: uuid.UUID) -> QuerySet[BatchAuditEvent]:
    """The batch's audit events, oldest first."""
    return BatchAuditEvent.objects.filter(batch_id=batch_id).order_by("at", "id")


class AuditTrailMixin:
    """For the batch admin: `audit_trail`, a read-only field with the latest events."""

    @admin.display(description="audit trail")
    def audit_trail(self, batch: BatchJob) -> SafeString:
        return audit_table(batch)


def audit_table(batch: BatchJob) -> SafeString:
    """The latest events as a small table (bounded: a batch resized in a loop stays readable)."""
    events = list(BatchAuditEvent.objects.filter(batch_id=batch.pk).order_by("-at", "-id")[:ADMIN_EVENTS])
    if not events:
        return format_html("{}", "—")
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
        (
            (f"{e.at:%Y-%m-%d %H:%M:%S}", e.get_action_display(), e.actor_name or "system", json.dumps(e.details))
            for e in reversed(events)
        ),
    )
    head = "<tr><th>at (UTC)</th><th>action</th><th>by</th><th>details</th></tr>"
    return format_html('<table class="batch-audit">{}{}</table>', SafeString(head), rows)
