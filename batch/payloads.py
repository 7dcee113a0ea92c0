"""Plain-dict views of batches and items for the WebSocket, and the dashboard's reads.

The fields are the REST API's (`batch.api.serializers`), so both speak the contract alike;
JSON-ready (UUIDs and datetimes as strings), URLs relative.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.db.models import F, Q, QuerySet
from rest_framework import serializers

from batch.api.serializers import BatchSerializer, ItemSerializer
from batch.models import ACTIVE_BATCH_STATUSES, BatchJob, BatchJobItem, ItemStatus

RECENT_BATCHES = 20
RECENT_ITEMS = 50
MAX_RESULT_CHARS = 2_000


def batch_payload(batch: BatchJob) -> dict[str, Any]:
    """The API's batch fields (relative URLs), plus `updated_at` so clients can drop stale updates."""
    data = dict(BatchSerializer(batch, context={"request": None}).data)
    data["updated_at"] = serializers.DateTimeField().to_representation(batch.updated_at)
    return data


def _short_result(result: Any) -> Any:
    """Results can be large (a forecast); the dashboard gets a bounded preview."""
    if result is None:
        return None
    text = json.dumps(result, default=str)
    return result if len(text) <= MAX_RESULT_CHARS else {"preview": text[:MAX_RESULT_CHARS] + "…"}


def item_payload(item: BatchJobItem) -> dict[str, Any]:
    """The API's item fields, plus `batch_id`; a large `result` becomes a preview."""
    data = dict(ItemSerializer(item).data)
    data["batch_id"] = str(item.batch_id)
    data["result"] = _short_result(data["result"])
    return data


def _batches() -> QuerySet[BatchJob]:
    return BatchJob.objects.select_related("created_by")


def dashboard_batches() -> list[dict[str, Any]]:
    """Every active batch and the most recent finished ones, newest first."""
    active = list(_batches().filter(status__in=ACTIVE_BATCH_STATUSES).order_by("-created_at"))
    recent = list(_batches().exclude(status__in=ACTIVE_BATCH_STATUSES).order_by("-created_at")[:RECENT_BATCHES])
    rows = sorted(active + recent, key=lambda batch: batch.created_at, reverse=True)
    return [batch_payload(batch) for batch in rows]


def batch_snapshot(batch_id: uuid.UUID) -> dict[str, Any] | None:
    """A batch, its most recent item transitions and its most recent failures; None if unknown."""
    batch = _batches().filter(pk=batch_id).first()
    if batch is None:
        return None
    items = BatchJobItem.objects.filter(batch_id=batch_id)
    recent = items.filter(Q(started_at__isnull=False) | Q(attempts__gt=0)).order_by(
        F("finished_at").desc(nulls_first=True), F("started_at").desc(nulls_last=True)
    )[:RECENT_ITEMS]
    failures = items.filter(status=ItemStatus.FAILED).order_by("-finished_at")[:RECENT_ITEMS]
    return {
        "batch": batch_payload(batch),
        "items": [item_payload(item) for item in recent],
        "failures": [item_payload(item) for item in failures],
    }
