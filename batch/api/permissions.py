"""Who may act on a batch. Visibility itself is `selectors.batches_for` (invisible batches: 404)."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from batch import permissions
from batch.models import BatchJob


class BatchPermission(BasePermission):
    """The rules of `batch.permissions`: submit; cancel and resize your own batches, or others'
    with `batch.cancel_batchjob` / `batch.resize_batchjob` / `batch.pause_batchjob` /
    `batch.retry_batchjob` (403: you can see the batch)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        return getattr(view, "action", None) != "create" or permissions.can_submit(request.user)

    def has_object_permission(self, request: Request, view: APIView, obj: Any) -> bool:
        if not isinstance(obj, BatchJob):
            return False
        action = getattr(view, "action", None)
        if action in ("destroy", "cancel"):
            return permissions.can_cancel(request.user, obj)
        if action == "partial_update":
            return permissions.can_resize(request.user, obj)
        if action in ("pause", "resume"):
            return permissions.can_pause(request.user, obj)
        if action == "retry":
            return permissions.can_retry(request.user, obj)
        return True
