"""WebSocket URL routes of the live dashboard (mounted by `batchsite.asgi`)."""

from __future__ import annotations

from django.urls import path

from batch.consumers import BatchDetailConsumer, BatchListConsumer

websocket_urlpatterns = [
    path("ws/batches/", BatchListConsumer.as_asgi()),
    path("ws/batches/<uuid:batch_id>/", BatchDetailConsumer.as_asgi()),
]
