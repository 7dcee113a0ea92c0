"""Security round 3, the lifecycle surfaces: submit's stop rules and callback_url, export
(HEAD, concurrency, CSV injection, headers), the webhook's URL check and delivery, /metrics,
and how handler errors render. Each refusal is a problem body naming the field, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from batch import services
from batch.handlers import batch_handler
from batch.models import BatchJob
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


def post_submit(api_client: Any, **fields: Any) -> Any:
    body = json.dumps({"handler": "demo.noop", "items": [{}], **fields})
    return api_client.post("/api/batches/", body, content_type="application/json")


# --- submit's new fields: every bad value is a 400 naming it -----------------------------------


@pytest.mark.parametrize("value", [2**31, 2**63, 10**40])
def test_huge_max_failures_is_400_not_500(api_client: Any, value: int) -> None:
    body = assert_problem(post_submit(api_client, max_failures=value), 400)
    assert "max_failures" in body["errors"]
    assert not BatchJob.objects.exists()


def test_huge_max_failures_is_refused_by_the_service_too() -> None:
    with pytest.raises(services.SubmitError) as raised:
        services.submit_batch(handler="demo.noop", items=[{}], max_failures=2**63)
    assert "max_failures" in raised.value.errors
    assert not BatchJob.objects.exists()


def test_largest_max_failures_is_accepted(api_client: Any) -> None:
    response = post_submit(api_client, max_failures=2**31 - 1)
    assert response.status_code == 201, response.content
    assert response.json()["max_failures"] == 2**31 - 1


BAD_FIELD_VALUES = [
    ("max_failures", True),
    ("max_failures", 1.5),
    ("max_failures", "x"),
    ("max_failures", [1]),
    ("max_failures", {}),
    ("max_failures", 0),
    ("max_failures", "9" * 2000),
    ("max_attempts", None),
    ("max_attempts", True),
    ("max_attempts", 0),
    ("max_attempts", 2**70),
    ("deadline_seconds", False),
    ("deadline_seconds", "1e3"),
    ("deadline_seconds", 1e308),
    ("deadline_seconds", 2**70),
    ("deadline_seconds", 0),
    ("callback_url", None),
    ("callback_url", True),
    ("callback_url", 5),
    ("callback_url", ["http://x/"]),
    ("callback_url", {"url": "http://x/"}),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELD_VALUES)
def test_bad_stop_rule_or_callback_url_is_400_naming_the_field(api_client: Any, field: str, value: Any) -> None:
    body = assert_problem(post_submit(api_client, **{field: value}), 400)
    assert list(body["errors"]) == [field]
    assert not BatchJob.objects.exists()


# --- export: HEAD does not run the export ------------------------------------------------------


async def asgi_request(method: str, path: str, query: str, token: str) -> tuple[int, dict[str, str], bytes]:
    """One request through Django's own ASGI handler (the test clients drop a HEAD's body themselves)."""
    from django.core.handlers.asgi import ASGIHandler

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Token {token}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    received = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if received:
            return received.pop()
        await asyncio.sleep(3600)  # never disconnects
        raise AssertionError

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(dict(message))

    await asyncio.wait_for(ASGIHandler()(scope, receive, send), timeout=30)
    start = next(message for message in sent if message["type"] == "http.response.start")
    headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return start["status"], headers, body


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_head_of_an_export_reads_no_item_and_sends_no_body(
    user: Any, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    from asgiref.sync import sync_to_async
    from rest_framework.authtoken.models import Token

    from batch import selectors
    from batch.api import concurrency

    submitted = await sync_to_async(services.submit_batch)(
        handler="demo.noop", items=[{"i": i} for i in range(30)], created_by=user
    )
    token = (await sync_to_async(Token.objects.get_or_create)(user=user))[0].key
    reads: list[str] = []
    real_chunk, real_keys = selectors.export_chunk, selectors.json_keys

    def recorded(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(selectors, "export_chunk", recorded("chunk", real_chunk))
    monkeypatch.setattr(selectors, "json_keys", recorded("keys", real_keys))
    path = f"/api/batches/{submitted.batch.pk}/export/"

    status, headers, body = await asgi_request("HEAD", path, f"as={fmt}", token)
    assert (status, body, reads) == (200, b"", [])
    assert headers["content-disposition"] == f'attachment; filename="batch-{submitted.batch.pk}.{fmt}"'
    assert headers["x-content-type-options"] == "nosniff"

    status, headers, body = await asgi_request("GET", path, f"as={fmt}", token)
    assert status == 200 and len(body.splitlines()) == 30 + (fmt == "csv") and "chunk" in reads
    assert concurrency.exports.held(user) == 0  # both responses closed: their slots are free


# --- export: a bound on one user's concurrent exports -------------------------------------------


def export_url(batch: BatchJob, fmt: str = "jsonl") -> str:
    return f"/api/batches/{batch.pk}/export/?as={fmt}"


def close(response: Any) -> None:
    """What the server does when a client goes away mid-download (not closing the test's connection)."""
    from django.core.signals import request_finished
    from django.db import close_old_connections

    request_finished.disconnect(close_old_connections)
    try:
        response.close()
    finally:
        request_finished.connect(close_old_connections)


def test_concurrent_exports_of_one_user_are_bounded_until_each_stream_ends(
    api_client: Any, client_for: Any, make_user: Any, user: Any, submit: Any, settings: Any
) -> None:
    from batch.api import concurrency

    settings.BATCH_MAX_CONCURRENT_EXPORTS_PER_USER = 2
    batch = submit("demo.noop", [{"i": i} for i in range(5)], created_by=user)
    first, second = api_client.get(export_url(batch)), api_client.get(export_url(batch, "csv"))
    assert (first.status_code, second.status_code) == (200, 200)  # streaming, not read yet

    refused = api_client.get(export_url(batch))
    body = assert_problem(refused, 429)
    assert refused["Retry-After"] == "5" and "exports" in body["detail"]
    bob = make_user("bob")
    assert client_for(bob).get(export_url(submit("demo.noop", [{}], created_by=bob))).status_code == 200
    assert_problem(client_for(bob).get(export_url(batch)), 404)  # others' batches stay hidden

    assert len(b"".join(first.streaming_content).splitlines()) == 5  # read to the end: its slot is free
    third = api_client.get(export_url(batch))
    assert third.status_code == 200
    close(second)  # a client that went away
    assert concurrency.exports.held(user) == 1
    close(third)
    assert concurrency.exports.held(user) == 0


def test_a_refused_or_invisible_export_holds_no_slot(api_client: Any, make_user: Any, submit: Any, user: Any) -> None:
    from batch.api import concurrency

    batch = submit("demo.noop", [{}], created_by=user)
    assert_problem(api_client.get(export_url(batch, "xlsx")), 400)
    assert_problem(api_client.get(export_url(submit("demo.noop", [{}], created_by=make_user("bob")))), 404)
    head = api_client.head(export_url(batch))
    assert head.status_code == 200 and head["Content-Type"] == "application/x-ndjson"
    assert concurrency.exports.held(user) == 0


def test_admin_download_past_the_bound_is_a_message(make_user: Any, submit: Any, settings: Any) -> None:
    from django.test import Client

    from tests.conftest import grant

    settings.BATCH_MAX_CONCURRENT_EXPORTS_PER_USER = 1
    staff = make_user("viewer", is_staff=True)
    grant(staff, "view_batchjob")
    client = Client()
    client.force_login(staff)
    batch = submit("demo.noop", [{}], created_by=staff)
    form = {"action": "download_results", "_selected_action": [str(batch.pk)]}
    first = client.post("/admin/batch/batchjob/", form)
    assert first.status_code == 200 and first.streaming
    refused = client.post("/admin/batch/batchjob/", form, follow=True)
    assert not refused.streaming
    assert "At most 1 exports of one user at once" in refused.content.decode()
    close(first)
    assert client.post("/admin/batch/batchjob/", form).streaming


# --- webhook delivery: one attempt is over within its total timeout, whatever the server does ---


class TricklingServer:
    """Accepts one request, then answers one byte every `gap` seconds for `seconds` (each byte in
    time for any per-read timeout), or a huge body at full speed."""

    def __init__(self, mode: str, *, gap: float = 0.1, seconds: float = 8.0) -> None:
        self.mode, self.gap, self.seconds = mode, gap, seconds
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, contextlib.suppress(OSError):
            self.received = self._request(conn)
            if self.mode == "big":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
                for _ in range(15000):  # 1 GB unless the client stops reading
                    conn.sendall(b"x" * 65536)
                return
            if self.mode == "reset":  # promises 1000 bytes, sends 10, resets the connection
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                time.sleep(0.2)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\n" if self.mode == "body" else b"HTTP/1.1 200 OK\r\nX-Slow: ")
            if self.mode == "body":
                conn.sendall(b"Content-Length: 1000000\r\n\r\n")
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                conn.sendall(b"x")
                time.sleep(self.gap)

    @staticmethod
    def _request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += conn.recv(65536)
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self.listener.close()
        self.thread.join(15)


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_a_trickling_receiver_cannot_hold_a_delivery_thread_past_the_total_timeout(
    monkeypatch: pytest.MonkeyPatch, settings: Any, mode: str
) -> None:
    from batch import callbacks_delivery

    monkeypatch.setattr(callbacks_delivery, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(callbacks_delivery, "TOTAL_TIMEOUT", 1.0)
    settings.BATCH_CALLBACK_SECRET = "s3cret"
    server = TricklingServer(mode)
    started = time.monotonic()
    attempt = callbacks_delivery.post(f"http://127.0.0.1:{server.port}/hook?a=1", b'{"id":1}', delivery_id=7)
    elapsed = time.monotonic() - started
    server.close()
    assert elapsed < 3.0  # the server would trickle for 8 s
    assert not attempt.delivered and "1 s" in attempt.error
    request_head, _, sent_body = server.received.partition(b"\r\n\r\n")
    assert request_head.startswith(b"POST /hook?a=1 HTTP/1.1\r\n")
    assert sent_body == b'{"id":1}'  # the body is sent exactly as signed
    assert callbacks_delivery.signature(b'{"id":1}', "s3cret").encode() in request_head


def test_a_huge_response_body_is_not_read_past_the_bound() -> None:
    from batch import callbacks_delivery

    server = TricklingServer("big")
    started = time.monotonic()
    attempt = callbacks_delivery.post(f"http://127.0.0.1:{server.port}/", b"{}", delivery_id=1)
    server.close()
    assert attempt.delivered and time.monotonic() - started < 5.0


def test_a_connection_reset_mid_body_is_a_failed_attempt_not_an_exception() -> None:
    """requests raised urllib3's ProtocolError out of `post` here, which no caller records: the
    delivery was sent again at every lease expiry, its attempts never counted, never given up."""
    from batch import callbacks_delivery

    server = TricklingServer("reset")
    attempt = callbacks_delivery.post(f"http://127.0.0.1:{server.port}/", b"{}", delivery_id=1)
    server.close()
    assert not attempt.delivered and attempt.status_code is None and "ConnectionResetError" in attempt.error


# --- handler error text, batch names and webhook errors render as text in the admin ------------

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_error_texts_render_escaped_in_the_admin(admin_client: Any, submit: Any) -> None:
    from django.utils import timezone

    from batch.models import BatchCallback, BatchJobItem

    batch = submit("demo.noop", [{XSS: XSS}], name=XSS)
    item = BatchJobItem.objects.get(batch=batch)
    BatchJobItem.objects.filter(pk=item.pk).update(
        error=f"ValueError: {XSS}", errors=[{"attempt": 1, "error": f"ValueError: {XSS}", "at": "now"}]
    )
    now = timezone.now()
    BatchCallback.objects.create(
        batch=batch, url="http://h/", body="{}", created_at=now, next_attempt_at=now, last_error=f"HTTP 302 ({XSS})"
    )
    pages = [
        "/admin/batch/batchjobitem/",
        f"/admin/batch/batchjobitem/{item.pk}/change/",
        f"/admin/batch/batchjob/{batch.pk}/change/",
        "/admin/batch/batchjob/",
        "/admin/batch/batchcallback/",
        "/admin/batch/dashboard/",
        f"/admin/batch/dashboard/{batch.pk}/",
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        html = response.content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html, page
        if "/dashboard/" not in page:  # the dashboards get their data over the WebSocket, shown with textContent
            assert "&lt;script&gt;" in html or "\\u003Cscript" in html, page


# --- CSV: no cell a spreadsheet would run, header or body -------------------------------------


def test_csv_cells_that_look_like_formulas_are_neutralised_in_keys_values_and_errors(
    api_client: Any, user: Any, submit: Any
) -> None:
    import csv
    import io

    from batch.export import FORMULA_STARTS
    from tests.test_export import body, get_export, run_all

    formulas = ["=1+1", "+1", "-A1", "@SUM(A1)", "\tx", "\rx", '=HYPERLINK("http://evil/")']
    items = [{formula: formula, "k" * 300 + formula: formula} for formula in formulas]  # the long key overflows
    batch = submit("demo.noop", items, created_by=user)
    batch = run_all(batch, lambda i: ("failed", formulas[i], formulas[i]))  # a list-less, non-object result
    rows = list(csv.reader(io.StringIO(body(get_export(api_client, batch, "csv")).decode(), newline="")))
    header, cells = rows[0], [cell for row in rows[1:] for cell in row]
    assert header[:3] == ["index", "status", "attempts"] and header[-1] == "error"
    assert not [name for name in header if name.startswith(FORMULA_STARTS)]
    assert not [cell for cell in cells if cell.startswith(FORMULA_STARTS)]
    assert '\'=HYPERLINK("http://evil/")' in cells  # kept, behind a quote


# --- callback_url: what may be called (the check and the sender parse the URL alike) -----------

ALLOWED = ["hooks.example.com", "10.0.0.5:9000", "[::1]:9000"]
REFUSED_URLS = [
    "http://hooks.example.com./x",  # trailing dot: another name to the check
    "http://hooks.example.com@evil.com/",
    "http://evil.com@hooks.example.com/",
    "http://evil.com\\@hooks.example.com/",
    "http://hooks.example.com\\@evil.com/",
    "http://hooks.example.com\\.evil.com/",
    "http://hooks.example.com%2eevil.com/",
    "http://hooks%2eexample.com/",
    "http://hooks.example.com:80@evil/",
    "http://[::1]:9000@evil/",
    "http://hooks.exam\u0440le.com/",  # Cyrillic er
    "http://hooks.example.com\u3002evil.com/",
    "http://hooks.example.com\uff0fevil.com/",
    "http://167772165:9000/",  # 10.0.0.5 as a decimal, octal, hex, short form
    "http://012.0.0.05:9000/",
    "http://0x0a000005:9000/",
    "http://10.5:9000/",
    "http://[0:0:0:0:0:0:0:1]:9000/",
    "http://[::ffff:10.0.0.5]:9000/",
    "http://10.0.0.5:9001/",
    "http://hooks.example.com:+80/",
    "http://hooks.example.com:65536/",
    "http://hooks.example.com:-1/",
    "gopher://hooks.example.com/",
    "file://hooks.example.com/etc/passwd",
    "http:/hooks.example.com/",
    "//hooks.example.com/",
    "http://hooks.example.com\t/",
    "http://hooks.example.com\u200b/",
    " http://hooks.example.com/",
    "http://hooks.example.com/" + "a" * 2000,
]
ACCEPTED_URLS = [
    ("http://hooks.example.com/x", "hooks.example.com"),
    ("HTTPS://HOOKS.EXAMPLE.COM:443/x", "hooks.example.com"),
    ("http://hooks.example.com#@evil.com/", "hooks.example.com"),
    ("http://hooks.example.com?@evil.com/", "hooks.example.com"),
    ("http://hoo\u212as.example.com/", "hooks.example.com"),  # the Kelvin sign lowercases to k
    ("http://10.0.0.5:9000/", "10.0.0.5"),
    ("http://[::1]:9000/", "::1"),
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_callback_urls_that_could_reach_another_host_are_refused(settings: Any, url: str) -> None:
    from batch.services.callbacks import callback_url_problem

    settings.BATCH_CALLBACK_ALLOWED_HOSTS = ALLOWED
    assert callback_url_problem(url) is not None


@pytest.mark.parametrize(("url", "host"), ACCEPTED_URLS)
def test_an_accepted_callback_url_is_sent_to_the_allowed_host(settings: Any, url: str, host: str) -> None:
    from urllib.parse import urlsplit

    from batch.services.callbacks import callback_url_problem

    settings.BATCH_CALLBACK_ALLOWED_HOSTS = ALLOWED
    assert callback_url_problem(url) is None
    assert urlsplit(url).hostname == host  # what batch.callbacks_delivery.post connects to


# --- a handler's exception text cannot break the write of its step -------------------------------


@batch_handler("test.bad_message")
async def bad_message(params: dict[str, Any], ctx: Any) -> dict[str, int]:
    if params["i"] % 2:
        raise ValueError("bad \ud800 text \x00 here")
    return {"i": params["i"]}


@pytest.mark.django_db(transaction=True)
async def test_an_exception_message_with_a_lone_surrogate_or_nul_fails_only_its_item() -> None:
    """Such a message made the step's UPDATE raise UnicodeEncodeError (not a DatabaseError, so
    not isolated) on both databases: every outcome of the step was lost and the run broke."""
    from asgiref.sync import sync_to_async

    from batch.models import BatchJobItem, BatchStatus, ItemStatus
    from tests.test_worker import run_worker

    submitted = await sync_to_async(services.submit_batch)(
        handler="test.bad_message", items=[{"i": i} for i in range(6)], max_attempts=1
    )
    await run_worker()
    batch = await BatchJob.objects.aget(pk=submitted.batch.pk)
    assert (batch.status, batch.succeeded_items, batch.failed_items) == (BatchStatus.FAILED, 3, 3)
    failed = await BatchJobItem.objects.aget(batch=batch, index=1)
    assert failed.status == ItemStatus.FAILED
    assert failed.error == "ValueError: bad \\ud800 text \\x00 here"
    assert failed.errors[-1]["error"] == failed.error


async def test_an_outcome_the_driver_cannot_encode_fails_alone_and_the_rest_of_the_step_happens() -> None:
    from batch.models import ItemStatus
    from batch.services import Outcome, Step, StepResult
    from tests.test_store import fake_store

    written: list[Outcome] = []

    def write(step: Step) -> StepResult:
        for outcome in step.outcomes:
            outcome.error.encode()  # what psycopg and sqlite3 do: UnicodeEncodeError on "\ud800"
        written.extend(step.outcomes)
        return StepResult(fetched=[], status="running")

    store = fake_store(write)
    outcomes = [Outcome(1, ItemStatus.SUCCEEDED), Outcome(2, ItemStatus.FAILED, error="\ud800")]
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        for outcome in outcomes:
            group.create_task(store.complete([outcome]))
        group.create_task(store.refill())
    by_id = {o.item_id: o for o in written}
    assert by_id[1].status == ItemStatus.SUCCEEDED
    assert by_id[2].status == ItemStatus.FAILED and "UnicodeEncodeError" in by_id[2].error
