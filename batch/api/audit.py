"""`GET /api/batches/{id}/events/`: the batch's audit trail (who submitted, cancelled, resized)."""

from __future__ import annotations

import uuid
from typing import Any

from django.shortcuts import get_object_or_404
from rest_framework import generics, serializers

from batch import audit, selectors
from batch.api.pagination import BatchPagination
from batch.models import BatchAuditEvent


class AuditEventSerializer(serializers.ModelSerializer[BatchAuditEvent]):
    actor = serializers.CharField(source="actor_name", read_only=True, help_text="Username; empty: system.")

    class Meta:
        model = BatchAuditEvent
        fields = ["action", "actor", "at", "details"]
        read_only_fields = fields


class BatchEventsView(generics.ListAPIView[BatchAuditEvent]):
    """Audit events of one visible batch, oldest first (another user's batch: 404)."""

    serializer_class = AuditEventSerializer
    pagination_class = BatchPagination

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reading the view
            return BatchAuditEvent.objects.none()
        batch_id: uuid.UUID = self.kwargs["pk"]
        batch = get_object_or_404(selectors.batches_for(self.request.user), pk=batch_id)
        return audit.events_of(batch.pk)
