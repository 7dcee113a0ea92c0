"""Routes under /api/: the batch viewset, the OpenAPI schema and its interactive docs."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from batch.api.audit import BatchEventsView
from batch.api.views import BatchViewSet

# No format suffixes (`/api/batches.json`): the views take no `format` argument (they answered
# 500), and `?format=json` or the Accept header already choose the renderer.
router = DefaultRouter()
router.include_format_suffixes = False
router.register("batches", BatchViewSet, basename="batch")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("auth/", include("rest_framework.urls")),
    path("batches/<uuid:pk>/events/", BatchEventsView.as_view(), name="batch-events"),
    path("", include(router.urls)),
]
