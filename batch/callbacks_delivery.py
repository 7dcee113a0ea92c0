"""The worker's webhook sender: claims due outbox rows and POSTs them, signed.

One asyncio task per `runbatch` worker (`Worker.run` starts it). It looks for due deliveries
when a batch finishes (the in-process `batch_finished`, and on PostgreSQL the `completed`
notification of any process), when a retry it scheduled comes due, and every `POLL_SECONDS`
otherwise. Each delivery is leased in the database (`services.callbacks.claim_due`), so two
workers never send the same row at once; a worker that dies mid-send leaves it to another once
the lease ends (at least once overall). The HTTP call runs in a thread, off the event loop.

A request: `POST <url>` with the stored body, `Content-Type: application/json`,
`X-Batch-Signature: sha256=<hex HMAC-SHA256 of the body, key BATCH_CALLBACK_SECRET>`,
`X-Batch-Delivery: <id>`, `X-Batch-Event: batch.finished`; connect timeout 3 s, reads 7 s,
10 s in all (enforced in the sending thread too); redirects are never followed (a 3xx is a failed
attempt); at most `MAX_RESPONSE_BYTES` of the response are read; no proxy or credentials from the
environment (`http.client`, which reads neither).
The host is checked against BATCH_CALLBACK_ALLOWED_HOSTS again before every attempt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import http.client
import logging
import socket
import ssl
import threading
import time
from urllib.parse import quote, urlsplit

from django.conf import settings

from batch import metrics
from batch.models import CallbackStatus
from batch.services import callbacks
from batch.services.callbacks import Attempt, DueCallback
from batch.signals import batch_finished
from batch.store import call_db

logger = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # the fallback: deliveries another process queued, retries another worker scheduled
LEASE_SECONDS = 60.0  # well above one attempt's 10 s
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 7.0
TOTAL_TIMEOUT = 10.0
MAX_IN_FLIGHT = 4  # deliveries one worker sends at once
MAX_RESPONSE_BYTES = 4096
SIGNATURE_HEADER = "X-Batch-Signature"
RETRY_MARGIN = 0.01
URL_SAFE = "/%:@!$&'()*+,;=~-._"  # kept as written; anything else (non-ASCII) is percent-encoded


def signature(body: bytes, secret: str) -> str:
    """The `X-Batch-Signature` value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, *, delivery_id: int) -> Attempt:
    """One POST, blocking (run it in a thread); never raises for what the network does. It is over
    within TOTAL_TIMEOUT whatever the server does: a watchdog shuts the socket down then (a
    per-read timeout alone lets a server that sends a byte every few seconds hold the thread)."""
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(body, settings.BATCH_CALLBACK_SECRET),
        "X-Batch-Delivery": str(delivery_id),
        "X-Batch-Event": "batch.finished",
        "User-Agent": "batchsite-webhook/1",
    }
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=URL_SAFE) + (f"?{quote(parts.query, safe=URL_SAFE)}" if parts.query else "")
    conn = _connection(parts.scheme, parts.hostname or "", parts.port)
    watchdog = _Watchdog(conn)
    try:
        conn.connect()
        if watchdog.fired or conn.sock is None:  # resolving the name took it all: nothing to shut down
            raise TimeoutError
        conn.sock.settimeout(READ_TIMEOUT)
        conn.request("POST", target, body=body, headers=headers)  # Content-Length: the exact bytes signed
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)  # bounded; the rest is dropped with the connection
        if not watchdog.fired:  # else what was read may be cut short
            return _attempt(response.status, response.reason, response.getheader("Location") or "")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if not watchdog.fired:
            return Attempt(status_code=None, error=f"{type(exc).__name__}: {exc}")
    finally:
        watchdog.cancel()
        conn.close()
    return Attempt(status_code=None, error=f"No complete response within {TOTAL_TIMEOUT:g} s.")


def _connection(scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
    # http.client reads no proxy or .netrc from the environment and follows no redirect.
    if scheme.lower() == "https":
        return http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT, context=ssl.create_default_context())
    return http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)


class _Watchdog:
    """Shuts `conn`'s socket down TOTAL_TIMEOUT from now, which ends any read blocked on it."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn, self.fired = conn, False
        self.timer = threading.Timer(TOTAL_TIMEOUT, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        self.fired = True
        if (sock := self.conn.sock) is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self.timer.cancel()


def _attempt(code: int, reason: str, location: str) -> Attempt:
    if 200 <= code < 300:
        return Attempt(status_code=code)
    if 300 <= code < 400:
        return Attempt(status_code=code, error=f"HTTP {code}: redirects are not followed (Location: {location[:200]})")
    return Attempt(status_code=code, error=f"HTTP {code} {reason or ''}".strip())


async def _in_daemon_thread(url: str, body: bytes, delivery_id: int) -> Attempt:
    """`post` in a thread of its own, a daemon: its watchdog ends the socket at TOTAL_TIMEOUT, but
    not a name lookup that hangs, and a thread of the loop's default executor would be joined
    when the worker exits (`asyncio.run`), so a stuck POST would hold the shutdown up."""
    done: concurrent.futures.Future[Attempt] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome = post(url, body, delivery_id=delivery_id)
        except BaseException as exc:  # reported to the awaiting task, if it still waits
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # it gave up: cancelled
                done.set_exception(exc)
            return
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            done.set_result(outcome)

    threading.Thread(target=run, name=f"webhook-{delivery_id}", daemon=True).start()
    return await asyncio.wrap_future(done)


class CallbackSender:
    """Delivers due webhooks until `closed` is set (see the module docstring)."""

    def __init__(self, *, worker_id: str, poll_seconds: float = POLL_SECONDS) -> None:
        self.worker_id = worker_id
        self.poll_seconds = poll_seconds
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retries: list[float] = []  # monotonic times of the retries this sender scheduled

    def wake(self) -> None:
        """Look for due deliveries now (call on the loop's thread)."""
        self._wakeup.set()

    def _on_batch_finished(self, sender: object, **kwargs: object) -> None:
        # Sent on commit in whatever thread committed (the worker's database thread).
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self, closed: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        uid = f"callback-sender-{id(self)}"
        batch_finished.connect(self._on_batch_finished, weak=False, dispatch_uid=uid)
        try:
            while not closed.is_set():
                self._wakeup.clear()
                try:
                    sent = await self.deliver_due()
                except Exception:
                    logger.exception("webhook delivery round failed; retrying", extra={"worker_id": self.worker_id})
                    sent = 0
                if sent < MAX_IN_FLIGHT:  # else more may be due at once
                    await self._sleep(closed)
        finally:
            batch_finished.disconnect(dispatch_uid=uid)

    async def deliver_due(self) -> int:
        """Claim and send the deliveries due now (up to MAX_IN_FLIGHT at once); how many."""
        due = await call_db(
            callbacks.claim_due, worker_id=self.worker_id, limit=MAX_IN_FLIGHT, lease_seconds=LEASE_SECONDS
        )
        async with asyncio.TaskGroup() as group:
            for row in due:
                group.create_task(self._deliver(row))
        return len(due)

    async def _deliver(self, row: DueCallback) -> None:
        try:
            attempt = await self._send(row)
            recorded = await call_db(
                callbacks.record_attempt, callback_id=row.id, worker_id=self.worker_id, attempt=attempt
            )
        except Exception:  # one delivery's trouble is not its siblings' (the TaskGroup)
            logger.exception("webhook delivery failed", extra={"callback_id": row.id, "batch_id": str(row.batch_id)})
            return
        if recorded is None:
            return
        metrics.count_webhook("retry" if recorded.status == CallbackStatus.PENDING else recorded.status)
        if recorded.retry_in is not None:  # a little late rather than early by the database's clock
            self._retries.append(time.monotonic() + recorded.retry_in + RETRY_MARGIN)

    async def _send(self, row: DueCallback) -> Attempt:
        if not callbacks.host_allowed(row.url):
            return Attempt(
                status_code=None, error="The host is not in BATCH_CALLBACK_ALLOWED_HOSTS; not sent.", retry=False
            )
        try:
            return await asyncio.wait_for(_in_daemon_thread(row.url, row.body.encode(), row.id), TOTAL_TIMEOUT)
        except TimeoutError:
            return Attempt(status_code=None, error=f"No complete response within {TOTAL_TIMEOUT:g} s.")

    async def _sleep(self, closed: asyncio.Event) -> None:
        now = time.monotonic()
        self._retries = [at for at in self._retries if at > now]
        seconds = min([self.poll_seconds, *(at - now for at in self._retries)])
        waits = [asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(closed.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
