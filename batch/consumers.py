"""WebSocket consumers of the live dashboard: `/ws/batches/` and `/ws/batches/<id>/`.

Staff with `batch.view_batchjob` only: anyone else is refused at the handshake. On connect the client gets a
snapshot, then the coalesced `batch.updated` / `item.updated` events of `batch.events`.

The right to watch is checked again while the socket is open, from the database and the
session (not the handshake's cached user): every BATCH_WS_RECHECK_SECONDS, and at once when
the user logs out (`user_logged_out` → the user's group). A socket whose session ended, or
whose user lost `is_staff` or `view_batchjob`, is closed with 4403.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib import auth
from django.contrib.auth.signals import user_logged_out

from batch import payloads, permissions
from batch.events import BATCHES_GROUP, batch_group, publisher

logger = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
MAX_CLIENT_FRAME = 1024  # characters; a ping is 16


def user_group(user_id: object) -> str:
    """The group of every socket of one user: told to re-check at once when they log out."""
    return f"batch.user.{user_id}"


def _may_watch_now(session_key: str | None, user_id: object) -> bool:
    """The session still logs in the same user, who is still staff with `view_batchjob`."""
    if not session_key:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = auth.get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]  # only .session is read
    return bool(user.is_authenticated and user.pk == user_id and user.is_staff and permissions.can_view_all(user))


def _on_logged_out(sender: Any, *, user: Any = None, **kwargs: Any) -> None:
    layer = get_channel_layer()
    if user is not None and layer is not None:
        async_to_sync(layer.group_send)(user_group(user.pk), {"type": "access.recheck"})


user_logged_out.connect(_on_logged_out, dispatch_uid="batch.consumers.logout")


class _StaffConsumer(AsyncJsonWebsocketConsumer):
    groups: list[str] = []
    _rechecks: asyncio.Task[None] | None = None

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

    async def _watch_access(self) -> None:
        """After the handshake: join the user's group and re-check access periodically."""
        await self._join(user_group(self.scope["user"].pk))
        self._rechecks = asyncio.ensure_future(self._recheck_periodically())

    async def _recheck_periodically(self) -> None:
        while True:
            await asyncio.sleep(settings.BATCH_WS_RECHECK_SECONDS)
            if not await self._recheck():
                return

    async def _recheck(self) -> bool:
        session = self.scope.get("session")
        key = getattr(session, "session_key", None)
        if await database_sync_to_async(_may_watch_now)(key, self.scope["user"].pk):
            return True
        logger.info("closing a dashboard socket: access ended", extra={"user_id": self.scope["user"].pk})
        await self.close(code=CLOSE_FORBIDDEN)
        return False

    async def access_recheck(self, event: dict[str, Any]) -> None:
        await self._recheck()

    async def disconnect(self, code: int) -> None:
        if self._rechecks is not None:
            self._rechecks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rechecks

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
        await self._watch_access()
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
        await self._watch_access()
        await self.send_json({"type": "snapshot", **snapshot})
