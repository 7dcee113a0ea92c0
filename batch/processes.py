"""Sync handlers in a bounded pool of worker processes that can be killed.

`SyncProcessPool.call` runs one item of a plain `def` handler in one of at most `size` child
processes (started lazily, reused). Cancelling the awaiting task, or its `timeout` counted from
the handler's start, kills that child and returns only once it is dead: no handler code runs on.
The child sets Django up once with the parent's DATABASES and gives the handler an `ItemContext`
whose `cancelled` follows the caller's `cancel_event`; `ctx.wait(s)` is its cancellable sleep.
Built on stdlib `multiprocessing` (spawn or forkserver, never fork from a loop with threads):
ProcessPoolExecutor and pebble cannot kill the one process behind a call and wait for its death,
nor carry a per-call cancel flag and progress, which is most of this module. Spawn re-imports
the parent's `__main__`: a script using the pool needs the `if __name__ == "__main__"` guard.
SIGKILL without a SIGTERM grace: Python's default SIGTERM is just as abrupt, and a handler's
open transaction rolls back when its connection drops, so one signal keeps the wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch.handlers import HandlerSpec

logger = logging.getLogger(__name__)

LARGE_JOB = 32 * 1024  # bytes; a bigger job may not fit the pipe's buffer, so a thread sends it
Reply = tuple[Any, ...]


class HandlerError(Exception):
    """A handler's exception (or result) that could not travel back from its process."""

    def __init__(self, type_name: str, message: str, remote_kinds: tuple[str, ...] = ()) -> None:
        super().__init__(type_name, message)
        self.type_name, self.message = type_name, message
        self.remote_kinds = remote_kinds  # `class_path` of each class of the original exception

    def was_a(self, kinds: tuple[type[BaseException], ...]) -> bool:
        """Whether the original exception was an instance of one of `kinds` (by their names)."""
        return any(class_path(kind) in self.remote_kinds for kind in kinds)

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class HandlerTimeout(TimeoutError):
    """The item ran longer than `seconds` after its handler started; its process was killed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds

    def __str__(self) -> str:
        return f"Timed out after {self.seconds} s."


class HandlerCrashed(Exception):
    """The process running the handler died (os._exit, a signal, the pool closed); its exit
    code, negative for a signal's number, is in the message."""


class _RemoteTraceback(Exception):
    """The child's traceback, as the `__cause__` of the exception raised here."""


@dataclass(eq=False)
class _Slot:
    process: BaseProcess
    conn: Connection
    cancel: ProcessEvent  # the child's view of the batch's cancel_event
    fd: int
    pid: int
    inbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)  # None: pipe closed
    alive: bool = True
    ending: asyncio.Task[int] | None = None  # reaps the process, gives its exit code


class SyncProcessPool:
    """At most `size` child processes running sync handlers, one item each at a time.

    Use it from one event loop; `close()` it on that loop."""

    def __init__(self, size: int, *, start_method: str = "spawn") -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError("start_method must be 'spawn' or 'forkserver': forking a loop with threads is unsafe")
        self._size = size
        spawn = start_method == "spawn"
        self._mp: SpawnContext | ForkServerContext = (
            multiprocessing.get_context("spawn") if spawn else multiprocessing.get_context("forkserver")
        )
        self._free = asyncio.Semaphore(size)
        self._idle: list[_Slot] = []
        self._slots: set[_Slot] = set()  # every process not yet reaped
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    async def call(
        self,
        *,
        handler: HandlerSpec,
        params: dict[str, Any],
        batch_id: uuid.UUID,
        item_id: int,
        index: int,
        attempt: int,
        cancel_event: asyncio.Event,
        on_progress: Callable[[float, str], None] | None = None,
        # Counted from the handler's start in the child, which a caller's asyncio.timeout cannot see.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Run `handler` on one item in a child and give back its result or raise its exception.

        Waits for an idle child first (not part of `timeout`). Raises `HandlerTimeout`,
        `HandlerCrashed` or `HandlerError` (see above); on cancellation, kills the child and
        raises `CancelledError` once it is dead."""
        if handler.is_async:
            raise ValueError(f"handler {handler.name!r} is async: it runs on the loop, not in a process")
        job = (handler.name, handler.func.__module__, params, batch_id, item_id, index, attempt)
        async with self._free:
            slot = await self._take()
            try:
                reply = await self._run(slot, job, cancel_event, on_progress, timeout)
            except BaseException as exc:
                from batch import metrics  # not at the top: the children import this module before Django

                metrics.count_kill(exc)
                await _uncancellable(self._end(slot))
                raise
            if reply is None:
                code = await _uncancellable(self._end(slot))
                closed = " (the pool was closed)" if self._closed else ""
                raise HandlerCrashed(f"The handler's process {slot.pid} died{closed}: exit code {code}.")
            self._idle.append(slot)
        if reply[0] == "ok":
            return reply[1]
        raise _exception(reply)

    async def close(self) -> None:
        """Kill every child (an idle one holds nothing: its connections closed after its item),
        return once all are dead; calls in flight raise `HandlerCrashed`. Idempotent."""
        self._closed = True
        self._idle.clear()
        for ending in [self._end(slot) for slot in self._slots]:
            await _uncancellable(ending)

    async def _take(self) -> _Slot:
        while self._idle:
            slot = self._idle.pop()
            if slot.alive:
                return slot
            await _uncancellable(self._end(slot))  # died while idle
        if self._closed:
            raise RuntimeError("the process pool is closed")
        return self._spawn()

    def _spawn(self) -> _Slot:
        from django.conf import settings

        conn, child_conn = self._mp.Pipe()
        cancel = self._mp.Event()
        args = (child_conn, cancel, settings.SETTINGS_MODULE, settings.DATABASES)
        process = self._mp.Process(target=_child_main, args=args, name="batch-handler", daemon=True)
        process.start()
        child_conn.close()
        assert process.pid is not None
        slot = _Slot(process=process, conn=conn, cancel=cancel, fd=conn.fileno(), pid=process.pid)
        asyncio.get_running_loop().add_reader(slot.fd, self._on_readable, slot)
        self._slots.add(slot)
        logger.info("handler process started", extra={"pid": process.pid})
        return slot

    async def _run(
        self,
        slot: _Slot,
        job: tuple[Any, ...],
        cancel_event: asyncio.Event,
        on_progress: Callable[[float, str], None] | None,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Reply | None:
        """Hand `job` to the child; its final reply, or None if it died."""
        slot.cancel.clear()
        relay = asyncio.ensure_future(_relay_cancel(cancel_event, slot.cancel))
        deadline = asyncio.timeout(None)
        try:
            if not await _send(slot.conn, pickle.dumps(job)):
                return None
            async with deadline:
                while (raw := await slot.inbox.get()) is not None:
                    try:
                        reply: Reply = pickle.loads(raw)
                    except Exception as exc:  # the result's class cannot be imported here
                        return ("error", None, type(exc).__name__, f"The reply cannot be unpickled: {exc}", "")
                    if reply[0] == "started" and timeout is not None:
                        deadline.reschedule(asyncio.get_running_loop().time() + timeout)
                    elif reply[0] == "progress" and on_progress is not None:
                        on_progress(reply[1], reply[2])
                    elif reply[0] in ("ok", "error"):
                        return reply
                return None
        except TimeoutError:
            if deadline.expired() and timeout is not None:
                raise HandlerTimeout(timeout) from None
            raise
        finally:
            relay.cancel()

    def _on_readable(self, slot: _Slot) -> None:
        # One message per readiness: the loop calls again while more wait. A message is read
        # whole once it starts; the child writes it in one go, already pickled.
        try:
            slot.inbox.put_nowait(slot.conn.recv_bytes())
        except (EOFError, OSError):
            self._detach(slot)

    def _detach(self, slot: _Slot) -> None:
        """Stop reading from the child and close our end: an idle child then exits by itself."""
        if slot.alive:
            slot.alive = False
            asyncio.get_running_loop().remove_reader(slot.fd)
            slot.conn.close()
            slot.inbox.put_nowait(None)

    def _end(self, slot: _Slot) -> asyncio.Task[int]:
        if slot.ending is None:
            slot.ending = asyncio.ensure_future(self._reap(slot))
        return slot.ending

    async def _reap(self, slot: _Slot) -> int:
        """Kill the child; its exit code once it is gone (a negative one: the signal's number)."""
        self._detach(slot)
        slot.process.kill()
        delay = 0.001
        while (code := slot.process.exitcode) is None:  # polls waitpid(WNOHANG): reaps it
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        slot.process.close()
        self._slots.discard(slot)
        logger.info("handler process ended", extra={"pid": slot.pid, "exit_code": code})
        return code


async def _uncancellable(task: asyncio.Task[int]) -> int:
    """Await `task` to the end even if we are cancelled meanwhile; then re-raise the cancel."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


async def _relay_cancel(source: asyncio.Event, target: ProcessEvent) -> None:
    await source.wait()
    target.set()


async def _send(conn: Connection, data: bytes) -> bool:
    """Write a job to an idle child; False if its pipe is closed (it died while idle)."""
    try:
        if len(data) <= LARGE_JOB:  # fits an empty pipe's buffer: cannot block
            conn.send_bytes(data)
        else:
            await asyncio.get_running_loop().run_in_executor(None, conn.send_bytes, data)
    except OSError:
        return False
    return True


def _exception(reply: Reply) -> BaseException:
    _, blob, type_name, message, remote_traceback, *rest = reply
    exc: BaseException = HandlerError(type_name, message, rest[0] if rest else ())
    if blob is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(blob)
    exc.__cause__ = _RemoteTraceback(remote_traceback)
    return exc


# --- the child ------------------------------------------------------------------------------


def _child_main(conn: Connection, cancel: ProcessEvent, settings_module: str, databases: dict[str, Any]) -> None:
    """A handler process: serve jobs from `conn` until the parent closes it or dies."""
    # The worker decides when handlers stop (drain, then kill): a terminal's Ctrl-C or a
    # service manager's SIGTERM to the whole group must not cut items short behind its back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    from django.conf import settings

    # The parent's databases (under pytest, the test database), not DATABASE_URL again. No
    # connection pool: one item at a time needs one connection, closed after each item.
    settings.DATABASES = {alias: _without_pool(config) for alias, config in databases.items()}
    # Daphne's app only serves HTTP; importing it installs Twisted's reactor (0.9 s of a
    # child's start). Handlers never need it.
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "daphne"]
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        conn.send_bytes(_run_job(conn, cancel, job))


def _run_job(conn: Connection, cancel: ProcessEvent, job: tuple[Any, ...]) -> bytes:
    """Run one item; its pickled final reply."""
    import django.apps
    from django.db import connections

    name, module, params, batch_id, item_id, index, attempt = job
    try:
        if not django.apps.apps.ready:  # the first item of this process
            django.setup()
            from batch.handlers import autodiscover

            autodiscover()
        from batch.handlers import ItemContext, get_handler

        import_module(module)
        func = get_handler(name).func
        ctx = ItemContext(
            batch_id=batch_id,
            item_id=item_id,
            index=index,
            attempt=attempt,
            cancel_event=cancel,
            _on_progress=lambda c: conn.send(("progress", c.progress_fraction, c.progress_message)),
        )
        conn.send(("started",))
        result = func(params, ctx)
        try:
            return pickle.dumps(("ok", result))
        except Exception as exc:
            message = f"The result of handler {name!r} cannot be sent back (it must pickle): {exc}"
            raise HandlerError(type(exc).__name__, message) from exc
    except Exception as exc:
        return pickle.dumps(_error_reply(exc))
    finally:
        connections.close_all()


def _error_reply(exc: Exception) -> Reply:
    remote_traceback = traceback.format_exc()
    blob: bytes | None = None
    with contextlib.suppress(Exception):
        pickled = pickle.dumps(exc)
        pickle.loads(pickled)  # some exceptions pickle but cannot be rebuilt
        blob = pickled
    kinds = tuple(class_path(kind) for kind in type(exc).__mro__)
    return ("error", blob, type(exc).__name__, str(exc), remote_traceback, kinds)


def class_path(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _without_pool(config: dict[str, Any]) -> dict[str, Any]:
    options = {key: value for key, value in (config.get("OPTIONS") or {}).items() if key != "pool"}
    return {**config, "OPTIONS": options}


def _exit_with_parent() -> None:
    """An orphaned child must not run handler code on: exit when the parent is gone."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)
