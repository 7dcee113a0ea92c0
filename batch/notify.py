"""Wake workers at once on PostgreSQL: `LISTEN batch_control` (services send `pg_notify`).

Polling the database stays the fallback that always works; this only makes it prompt.
On SQLite there is nothing to listen to and the coroutine just waits to be closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg
from django.db import connection

from batch.services import CONTROL_CHANNEL

logger = logging.getLogger(__name__)


def _conninfo() -> dict[str, object]:
    params = connection.settings_dict
    info: dict[str, object] = {"dbname": params["NAME"], "autocommit": True}
    for key, name in (("USER", "user"), ("PASSWORD", "password"), ("HOST", "host"), ("PORT", "port")):
        if params.get(key):
            info[name] = params[key]
    return info


async def _pump_until_closed(
    conn: psycopg.AsyncConnection[object], on_notify: Callable[[], None], closed: asyncio.Event
) -> None:
    async def pump() -> None:
        async for _ in conn.notifies():
            on_notify()

    pumping = asyncio.ensure_future(pump())
    closing = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait({pumping, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        pumping.cancel()
        closing.cancel()
    if pumping.done() and not pumping.cancelled():
        pumping.result()  # re-raises a lost connection, for the caller to reconnect


async def listen_for_control(on_notify: Callable[[], None], closed: asyncio.Event) -> None:
    """Call `on_notify` for every control notification until `closed` is set."""
    if connection.vendor != "postgresql":
        await closed.wait()
        return
    delay = 0.1
    while not closed.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(**_conninfo()) as conn:  # type: ignore[arg-type]
                await conn.execute(f"LISTEN {CONTROL_CHANNEL}")
                delay = 0.1
                on_notify()  # anything sent while we were not listening
                await _pump_until_closed(conn, on_notify, closed)
        except psycopg.Error as exc:
            logger.warning("notification listener lost its connection, retrying in %.1fs: %s", delay, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)
