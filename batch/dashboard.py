"""The live dashboard pages under /admin/batch/dashboard/ (staff only, in the admin's look).

The pages are static shells: `batch/static/batch/dashboard.js` fills them from the
WebSocket snapshot and events and calls the REST API (session + CSRF) to submit, resize,
cancel, pause, resume and retry (`batch/static/batch/actions.js`).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse

from batch import permissions
from batch.handlers import registered_handlers
from batch.models import BatchJob


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "wsPath": "/ws/batches/",
        # Wherever the project mounts the app's URLconfs (`batch.api.urls`, `batch.dashboard`).
        "apiBatches": reverse("batch-list"),
        "dashboardUrl": reverse("batch_dashboard"),
        "changeUrl": reverse("admin:batch_batchjob_changelist"),
        "globalMaxParallel": settings.BATCH_GLOBAL_MAX_PARALLEL,
        "drainTimeout": settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS,
        **extra,
    }


def _access(request: HttpRequest) -> dict[str, Any]:
    """Watching needs `batch.view_batchjob`; the controls shown follow `batch.permissions`."""
    if not permissions.can_view_all(request.user):
        raise PermissionDenied
    return {"permissions": permissions.dashboard_permissions(request.user), "username": request.user.get_username()}


def dashboard(request: HttpRequest) -> HttpResponse:
    """Every active and recent batch, live; and a small submit form."""
    access = _access(request)
    context = {
        **admin.site.each_context(request),
        "title": "Live dashboard",
        "handlers": list(registered_handlers()),
        "config": _config(batchId=None, **access),
    }
    return TemplateResponse(request, "admin/batch/dashboard.html", context)


def batch_dashboard(request: HttpRequest, batch_id: uuid.UUID) -> HttpResponse:
    """One batch, live: progress, parallelism, its controls, result downloads, recent items and failures."""
    access = _access(request)
    batch = get_object_or_404(BatchJob, pk=batch_id)
    context = {
        **admin.site.each_context(request),
        "title": batch.name or f"Batch {batch.pk.hex[:8]}",
        "batch": batch,
        "export_url": reverse("batch-export", args=[batch.pk]),  # ?as=jsonl|csv
        "config": _config(batchId=str(batch.pk), **access),
    }
    return TemplateResponse(request, "admin/batch/dashboard_batch.html", context)


urlpatterns = [
    path("", admin.site.admin_view(dashboard), name="batch_dashboard"),
    path("<uuid:batch_id>/", admin.site.admin_view(batch_dashboard), name="batch_dashboard_batch"),
]
