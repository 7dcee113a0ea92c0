"""ASGI middleware: refuse HTTP bodies over DATA_UPLOAD_MAX_MEMORY_SIZE before Django reads them.

Under ASGI Django spools the whole body (to disk past FILE_UPLOAD_MAX_MEMORY_SIZE) before any
view or parser can look at its size, so a client could fill the disk with one request. This
answers 413 (problem+json) on a too-large Content-Length at once, and stops reading a body sent
without one (chunked) as soon as it passes the limit.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings

Scope = dict[str, Any]
Message = dict[str, Any]


def _problem(instance: str, limit: int) -> bytes:
    return json.dumps(
        {
            "type": "urn:batchsite:problem:too-large",
            "title": "Request too large",
            "status": 413,
            "detail": f"The request body exceeds {limit} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE).",
            "instance": instance,
        }
    ).encode()


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class BodySizeLimit:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        limit: int | None = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > limit:
            await self._refuse(scope, send, limit)
            return
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            message: Message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}  # Django stops reading and gives up
            return message

        async def tracking_send(message: Message) -> None:
            state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if state["over"] and not state["started"]:
            await self._refuse(scope, send, limit)

    async def _refuse(self, scope: Scope, send: Any, limit: int) -> None:
        body = _problem(scope.get("path", ""), limit)
        headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
