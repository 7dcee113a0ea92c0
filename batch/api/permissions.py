"""Who may act on a batch. Visibility itself is `selectors.batches_for` (others' batches: 404)."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from batch.models import BatchJob


class IsOwnerOrStaff(BasePermission):
    """Object level, behind the visibility filter: the batch's creator, or staff."""

    def has_object_permission(self, request: Request, view: APIView, obj: Any) -> bool:
        if not isinstance(obj, BatchJob):
            return False
        return bool(request.user.is_staff or obj.created_by_id == request.user.pk)
