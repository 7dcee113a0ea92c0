"""ASGI entry point: HTTP through Django, WebSocket through `batch.routing`.

HTTP bodies over DATA_UPLOAD_MAX_MEMORY_SIZE are refused before Django spools them
(`bodylimit`). WebSockets (`batch.routing.websocket_application`) authenticate with the Django
session and must come from this site's own origin: scheme, host and port
(`batch.wsorigin.SameOriginValidator`).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "batchsite.settings")
django_application = get_asgi_application()  # sets Django up before the routes import models

from channels.routing import ProtocolTypeRouter  # noqa: E402

from batch.routing import websocket_application  # noqa: E402
from batchsite.bodylimit import BodySizeLimit  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodySizeLimit(django_application),
        "websocket": websocket_application(),
    }
)
