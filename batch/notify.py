"""Wake workers at once on PostgreSQL: `LISTEN batch_control` (services send `pg_notify`).

Polling the database stays the fallback that always works; this only makes it prompt.
On SQLite there is nothing to listen to and the coroutine just waits to be closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

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
    # libpq options (sslmode, application_name, …) apply to this connection too.
    options = params.get("OPTIONS") or {}
    info.update({key: value for key, value in options.items() if key not in _DJANGO_ONLY_OPTIONS})
    return info


_DJANGO_ONLY_OPTIONS = frozenset({"pool", "isolation_level", "server_side_binding", "assume_role", "cursor_factory"})


async def _pump_until_closed(
    conn: psycopg.AsyncConnection[object], on_notify: Callable[[str], None], closed: asyncio.Event
) -> None:
    async def pump() -> None:
        async for notification in conn.notifies():
            on_notify(notification.payload)

    pumping = asyncio.ensure_future(pump())
    closing = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait({pumping, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        pumping.cancel()
        closing.cancel()
    if pumping.done() and not pumping.cancelled():
        pumping.result()  # re-raises a lost connection, for the caller to reconnect


async def listen_for_control(on_notify: Callable[[str], None], closed: asyncio.Event) -> None:
    """Call `on_notify` with the payload (`kind:batch_id`) of every control notification until
    `closed` is set; with "" after (re)connecting, for anything sent while not listening."""
    if connection.vendor != "postgresql":
        await closed.wait()
        return
    delay = 0.1
    while not closed.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(**_conninfo()) as conn:  # type: ignore[arg-type]
                await conn.execute(f"LISTEN {CONTROL_CHANNEL}")
                delay = 0.1
                on_notify("")  # anything sent while we were not listening
                await _pump_until_closed(conn, on_notify, closed)
        except psycopg.Error as exc:
            logger.warning("notification listener lost its connection, retrying in %.1fs: %s", delay, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)


class ControlWatcher:
    """Process-wide: one thread LISTENs on `batch_control` and wakes asyncio waiters by batch id.

    A thread, not a task: WSGI and the test client run each async view on a loop of its own,
    so a listener task would die with the first request's loop. The thread starts with the
    first waiter and ends `linger` seconds after the last one; waiters poll as a fallback.
    """

    def __init__(self, *, linger: float = 2.0) -> None:
        self.linger = linger
        self.listening = False
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle_since = 0.0

    @contextlib.contextmanager
    def watch(self, batch_id: object) -> Iterator[asyncio.Event]:
        """An event set on every notification about `batch_id` while the block runs."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        key = str(batch_id)
        with self._lock:
            self._waiters.setdefault(key, set()).add(waiter)
            self._ensure_thread()
        try:
            yield waiter[1]
        finally:
            with self._lock:
                self._waiters[key].discard(waiter)
                if not self._waiters[key]:
                    del self._waiters[key]
                self._idle_since = time.monotonic()

    def wake(self, batch_id: object | None) -> None:
        """Wake the waiters of `batch_id` (None: all of them); callable from any thread."""
        with self._lock:
            if batch_id is None:
                waiters = [w for group in self._waiters.values() for w in group]
            else:
                waiters = list(self._waiters.get(str(batch_id), ()))
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that request's loop has closed
                loop.call_soon_threadsafe(event.set)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening connection now (tests: before the test database is dropped)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None or connection.vendor != "postgresql":
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="batch-control-watch", daemon=True)
        self._thread.start()

    def _done(self, stop: threading.Event) -> bool:
        with self._lock:
            if stop.is_set():
                return True
            if self._waiters or time.monotonic() - self._idle_since < self.linger:
                return False
            self._thread = None
            stop.set()
            return True

    def _run(self, stop: threading.Event) -> None:
        delay = 0.1
        while not self._done(stop):
            try:
                with psycopg.connect(**_conninfo()) as conn:  # type: ignore[arg-type]
                    conn.execute(f"LISTEN {CONTROL_CHANNEL}")
                    self.listening, delay = True, 0.1
                    self.wake(None)  # anything sent before we listened
                    while not self._done(stop):
                        for notice in conn.notifies(timeout=0.25):
                            self.wake(notice.payload.partition(":")[2])
            except psycopg.Error as exc:
                logger.warning("control watcher lost its connection, retrying in %.1fs: %s", delay, exc)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self.listening = False


control_watcher = ControlWatcher()
