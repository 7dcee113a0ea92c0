"""WebSocket routes of the live dashboard, and the ASGI application that serves them.

A project's `asgi.py` mounts them with `websocket_application()`:

    application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})
"""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.urls import URLPattern, path

from batch.consumers import BatchDetailConsumer, BatchListConsumer
from batch.wsorigin import SameOriginValidator

websocket_urlpatterns: list[URLPattern] = [
    path("ws/batches/", BatchListConsumer.as_asgi()),
    path("ws/batches/<uuid:batch_id>/", BatchDetailConsumer.as_asgi()),
]


def websocket_application(*, check_origin: bool = True) -> Any:
    """`websocket_urlpatterns` behind the Django session (the consumers admit staff only) and,
    unless `check_origin=False`, a same-origin check: scheme, host and port, or an origin in
    CSRF_TRUSTED_ORIGINS (no cross-site sockets)."""
    application = AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
    return SameOriginValidator(application) if check_origin else application
