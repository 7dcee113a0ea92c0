"""WebSocket consumers of the live dashboard: `/ws/batches/` and `/ws/batches/<id>/`.

Staff with `batch.view_batchjob` only: anyone else is refused at the handshake. On connect the client gets a
snapshot, then the coalesced `batch.updated` / `item.updated` events of `batch.events`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from batch import payloads, permissions
from batch.events import BATCHES_GROUP, batch_group, publisher

logger = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
MAX_CLIENT_FRAME = 1024  # characters; a ping is 16


class _StaffConsumer(AsyncJsonWebsocketConsumer):
    groups: list[str] = []

    async def _may_watch(self) -> bool:
        """Staff with `batch.view_batchjob` (the dashboard's rule); `has_perm` reads the database."""
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            return False
        return bool(await database_sync_to_async(permissions.can_view_all)(user))

    async def _join(self, group: str) -> None:
        publisher.bind_loop(asyncio.get_running_loop())
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups.append(group)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        """Clients only ping (`{"type": "ping"}`); anything else, malformed or not, is ignored."""
        if not text_data or len(text_data) > MAX_CLIENT_FRAME:
            return  # binary, empty or huge: not a ping, and not worth decoding
        try:
            message = json.loads(text_data)
        except (ValueError, RecursionError):  # deep nesting ([[[[…) raises RecursionError
            message = None
        if isinstance(message, dict) and message.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def batch_updated(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "batch.updated", "batch": event["batch"]})

    async def batch_items(self, event: dict[str, Any]) -> None:
        for item in event["items"]:
            await self.send_json({"type": "item.updated", "item": item})


class BatchListConsumer(_StaffConsumer):
    """Every batch: a snapshot of the active and recent ones, then their updates."""

    async def connect(self) -> None:
        self.groups = []
        if not await self._may_watch():
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self._join(BATCHES_GROUP)
        await self.accept()
        batches = await database_sync_to_async(payloads.dashboard_batches)()
        await self.send_json({"type": "snapshot", "batches": batches})


class BatchDetailConsumer(_StaffConsumer):
    """One batch: a snapshot with its recent items and failures, then its updates."""

    async def connect(self) -> None:
        self.groups = []
        if not await self._may_watch():
            await self.close(code=CLOSE_FORBIDDEN)
            return
        batch_id = uuid.UUID(str(self.scope["url_route"]["kwargs"]["batch_id"]))
        await self._join(batch_group(batch_id))
        snapshot = await database_sync_to_async(payloads.batch_snapshot)(batch_id)
        if snapshot is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.accept()
        await self.send_json({"type": "snapshot", **snapshot})
