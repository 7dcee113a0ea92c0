"""URL configuration: the admin and the batch app."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from batch.health_views import health

urlpatterns = [
    path("admin/batch/dashboard/", include("batch.dashboard")),
    path("admin/", admin.site.urls),
    path("api/", include("batch.api.urls")),
    path("health/", health, name="health"),
    path("metrics", include("batch.urls_metrics")),  # Prometheus (staff or BATCH_METRICS_TOKEN)
]

handler404 = "batch.api.exceptions.page_not_found"
handler500 = "batch.api.exceptions.server_error"
