"""`include("batch.urls_metrics")` under the path Prometheus scrapes, e.g. `path("metrics", include(...))`."""

from __future__ import annotations

from django.urls import path

from batch.metrics_view import metrics

urlpatterns = [path("", metrics, name="batch-metrics")]
