"""Completion webhooks and hooks: callback_url at submit, the outbox row written with the final
state, `batch_finished`, and signed delivery by the worker to a local receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core import checks
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import Client

from batch import services
from batch.callbacks_delivery import CallbackSender
from batch.checks import check_callbacks
from batch.models import BatchCallback, BatchJob, BatchStatus, CallbackStatus, ItemStatus
from batch.services import Outcome, callbacks
from batch.signals import batch_finished
from batch.worker import Worker, WorkerConfig
from tests.conftest import worker_log
from tests.problems import assert_problem

SECRET = "test-webhook-secret"
TIMEOUT = 30


# --- a local receiver: answers from a script, records every request ---------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A threaded HTTP server on 127.0.0.1: answers POSTs from `script` (status, headers) in
    order, then 200; `wait_for(n)` blocks until n requests came."""

    port: int = 0
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, request: Received) -> tuple[int, dict[str, str]]:
        with self.changed:
            self.requests.append(request)
            self.changed.notify_all()
            return self.script.pop(0) if self.script else (200, {})

    def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[Received]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.requests) >= count, timeout), self.requests
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, headers = state.answer(Received(self.path, dict(self.headers.items()), body))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def webhooks(settings: Any, receiver: Receiver) -> Receiver:
    """Callbacks to the receiver allowed, signed with SECRET, retried after 10 to 20 ms."""
    settings.BATCH_CALLBACK_ALLOWED_HOSTS = [f"127.0.0.1:{receiver.port}"]
    settings.BATCH_CALLBACK_SECRET = SECRET
    settings.BATCH_CALLBACK_BACKOFF_SECONDS = 0.02
    settings.BATCH_CALLBACK_RETRY_SECONDS = 3600.0
    return receiver


def expected_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


# --- helpers on the services --------------------------------------------------------------------


def finish_items(batch: BatchJob, count: int, status: ItemStatus = ItemStatus.SUCCEEDED) -> BatchJob:
    items = services.claim_items(batch_id=batch.pk, worker_id="w1", limit=count, lease_seconds=30)
    outcomes = [Outcome(item.id, status) for item in items]
    return services.complete_items(batch_id=batch.pk, worker_id="w1", outcomes=outcomes)


def finished_batch(url: str, *, items: int = 2) -> BatchJob:
    batch = services.submit_batch(handler="demo.noop", items=[{}] * items, callback_url=url).batch
    return finish_items(batch, items)


# --- submit: which URLs are accepted ------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("no_throttle")
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:{port}/hook",  # another host
        "http://127.0.0.1:1/hook",  # the allowed host on another port
        "ftp://127.0.0.1:{port}/hook",
        "http://user:pw@127.0.0.1:{port}/hook",
        "http://127.0.0.1:{port}/" + "x" * 2000,
        "http://127.0.0.1:{port}/a b",
        "not a url",
    ],
)
def test_submit_refuses_a_callback_url_that_may_not_be_called(api_client: Any, webhooks: Receiver, url: str) -> None:
    body = {"handler": "demo.noop", "items": [{}], "callback_url": url.format(port=webhooks.port)}
    problem = assert_problem(api_client.post("/api/batches/", body, format="json"), 400)
    assert list(problem["errors"]) == ["callback_url"]
    assert BatchJob.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.usefixtures("no_throttle")
def test_by_default_every_callback_url_is_refused(api_client: Any, receiver: Receiver) -> None:
    body = {"handler": "demo.noop", "items": [{}], "callback_url": receiver.url()}
    problem = assert_problem(api_client.post("/api/batches/", body, format="json"), 400)
    assert "not in BATCH_CALLBACK_ALLOWED_HOSTS" in problem["errors"]["callback_url"][0]


@pytest.mark.django_db
@pytest.mark.usefixtures("no_throttle")
def test_submit_accepts_an_allowed_callback_url_and_shows_it(api_client: Any, webhooks: Receiver) -> None:
    response = api_client.post(
        "/api/batches/", {"handler": "demo.noop", "items": [{}], "callback_url": webhooks.url()}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["callback_url"] == webhooks.url()
    assert api_client.get(response["Location"]).json()["callback_url"] == webhooks.url()


@pytest.mark.django_db
def test_submitbatch_takes_a_callback_url_and_refuses_one_not_allowed(webhooks: Receiver) -> None:
    call_command("submitbatch", "demo.noop", "--count", "1", "--callback-url", webhooks.url(), verbosity=0)
    assert BatchJob.objects.get().callback_url == webhooks.url()
    with pytest.raises(CommandError, match="callback_url"):
        call_command("submitbatch", "demo.noop", "--count", "1", "--callback-url", "http://10.0.0.1/", verbosity=0)


@pytest.mark.parametrize(
    ("allowed", "url", "ok"),
    [
        (["hooks.example.com"], "https://hooks.example.com/x", True),
        (["hooks.example.com"], "http://HOOKS.example.com:8080/x", True),  # no port: any port
        (["hooks.example.com:8443"], "https://hooks.example.com:8443/x", True),
        (["hooks.example.com:8443"], "https://hooks.example.com/x", False),  # 443 is not 8443
        (["hooks.example.com:443"], "https://hooks.example.com/x", True),  # the scheme's default port
        (["hooks.example.com"], "https://evil.hooks.example.com/x", False),  # exact names only
        (["[::1]:9000"], "http://[::1]:9000/x", True),
        (["::1"], "http://[::1]:9000/x", True),
        ([], "http://127.0.0.1/x", False),
    ],
)
def test_allowed_hosts_are_exact_names_with_an_optional_port(
    settings: Any, allowed: list[str], url: str, ok: bool
) -> None:
    settings.BATCH_CALLBACK_ALLOWED_HOSTS = allowed
    assert callbacks.host_allowed(url) is ok


def test_a_system_check_warns_when_callbacks_are_allowed_without_a_secret(settings: Any) -> None:
    settings.BATCH_CALLBACK_ALLOWED_HOSTS, settings.BATCH_CALLBACK_SECRET = ["hooks.example.com"], ""
    assert [message.id for message in check_callbacks()] == ["batch.W004"]
    assert isinstance(check_callbacks()[0], checks.Warning)
    settings.BATCH_CALLBACK_SECRET = "s3cret"
    assert check_callbacks() == []
    settings.BATCH_CALLBACK_ALLOWED_HOSTS = []
    settings.BATCH_CALLBACK_SECRET = ""
    assert check_callbacks() == []


# --- the outbox row: written in the transaction of the final state -------------------------------


@pytest.mark.django_db
def test_the_outbox_row_exists_exactly_once_the_batch_is_terminal(webhooks: Receiver) -> None:
    batch = services.submit_batch(handler="demo.noop", items=[{}] * 3, callback_url=webhooks.url()).batch
    running = finish_items(batch, 2)
    assert (running.status, BatchCallback.objects.count()) == (BatchStatus.RUNNING, 0)
    done = finish_items(batch, 1, status=ItemStatus.FAILED)
    assert done.status == BatchStatus.FAILED
    row = BatchCallback.objects.get()
    assert (row.batch_id, row.url, row.status, row.attempts) == (batch.pk, webhooks.url(), CallbackStatus.PENDING, 0)
    body = json.loads(row.body)
    assert (body["id"], body["status"], body["total_items"]) == (str(batch.pk), "failed", 3)
    assert (body["succeeded_items"], body["failed_items"], body["pending_items"]) == (2, 1, 0)
    assert body["finished_at"] is not None and body["callback_url"] == webhooks.url()
    assert row.body.isascii(), "the bytes sent and signed are the stored text's ASCII"


@pytest.mark.django_db
def test_a_batch_cancelled_before_it_started_gets_its_outbox_row_from_the_cancel(webhooks: Receiver) -> None:
    batch = services.submit_batch(handler="demo.noop", items=[{}] * 2, callback_url=webhooks.url()).batch
    result = services.request_cancel(batch_id=batch.pk)
    assert result.batch is not None and result.batch.status == BatchStatus.CANCELLED
    body = json.loads(BatchCallback.objects.get(batch=batch).body)
    assert (body["status"], body["cancelled_items"], body["status_reason"]) == ("cancelled", 2, "requested")


@pytest.mark.django_db
def test_a_batch_without_callback_url_writes_no_outbox_row(webhooks: Receiver) -> None:
    done = finish_items(services.submit_batch(handler="demo.noop", items=[{}]).batch, 1)
    assert done.status == BatchStatus.SUCCEEDED
    assert not BatchCallback.objects.exists()


@pytest.mark.django_db
def test_the_outbox_row_rolls_back_with_the_final_state(webhooks: Receiver) -> None:
    batch = services.submit_batch(handler="demo.noop", items=[{}], callback_url=webhooks.url()).batch

    class Abort(Exception):
        pass

    seen_inside: list[tuple[str, bool]] = []

    def finish_then_abort() -> None:
        with transaction.atomic():
            outcomes = [Outcome(item.id, ItemStatus.SUCCEEDED)]
            done = services.complete_items(batch_id=batch.pk, worker_id="w1", outcomes=outcomes)
            seen_inside.append((done.status, BatchCallback.objects.filter(batch=batch).exists()))
            raise Abort

    (item,) = services.claim_items(batch_id=batch.pk, worker_id="w1", limit=1, lease_seconds=30)
    with pytest.raises(Abort):
        finish_then_abort()
    assert seen_inside == [(BatchStatus.SUCCEEDED, True)]
    assert BatchJob.objects.get(pk=batch.pk).status == BatchStatus.RUNNING
    assert not BatchCallback.objects.exists()


class Finished:
    """Records `batch_finished` while connected."""

    def __init__(self) -> None:
        self.sent: list[tuple[uuid.UUID, str]] = []
        self.lock = threading.Lock()

    def __call__(self, sender: Any, *, batch_id: uuid.UUID, status: str, **kwargs: Any) -> None:
        with self.lock:
            self.sent.append((batch_id, status))


@pytest.fixture
def finished_signals() -> Iterator[Finished]:
    recorder = Finished()
    batch_finished.connect(recorder, weak=False, dispatch_uid="test-finished")
    yield recorder
    batch_finished.disconnect(dispatch_uid="test-finished")


@pytest.mark.django_db(transaction=True)
def test_batch_finished_fires_once_per_batch_on_commit(finished_signals: Finished) -> None:
    first = services.submit_batch(handler="demo.noop", items=[{}] * 2).batch
    with transaction.atomic():
        assert finish_items(first, 2).status == BatchStatus.SUCCEEDED
        assert finished_signals.sent == [], "not before the commit"
    assert finished_signals.sent == [(first.pk, "succeeded")]
    second = services.submit_batch(handler="demo.noop", items=[{}] * 2).batch
    services.request_cancel(batch_id=second.pk)  # the other path: finalize_if_done
    services.request_cancel(batch_id=second.pk)  # terminal: nothing more
    assert finished_signals.sent == [(first.pk, "succeeded"), (second.pk, "cancelled")]


@pytest.mark.django_db(transaction=True)
def test_two_workers_finishing_the_last_items_at_once_write_one_row_and_one_signal(
    webhooks: Receiver, finished_signals: Finished
) -> None:
    """Each of two workers holds the last running item of each batch and writes its outcome in a
    step at the same moment (a barrier); exactly one of them moves the batch to its end."""
    batches = [services.submit_batch(handler="demo.noop", items=[{}] * 2, callback_url=webhooks.url()).batch]
    batches += [services.submit_batch(handler="demo.noop", items=[{}] * 2, callback_url=webhooks.url()).batch]
    held = {
        (batch.pk, worker): services.claim_items(batch_id=batch.pk, worker_id=worker, limit=1, lease_seconds=30)[0]
        for batch in batches
        for worker in ("w1", "w2")
    }
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def finish(worker: str) -> None:
        try:
            for batch in batches:
                barrier.wait(timeout=10)
                item = held[(batch.pk, worker)]
                step = services.Step(outcomes=[Outcome(item.id, ItemStatus.SUCCEEDED)])
                services.run_step(batch_id=batch.pk, worker_id=worker, lease_seconds=30, step=step)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=finish, args=(worker,)) for worker in ("w1", "w2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    for batch in batches:
        assert BatchJob.objects.get(pk=batch.pk).status == BatchStatus.SUCCEEDED
        assert BatchCallback.objects.filter(batch=batch).count() == 1
    assert sorted(finished_signals.sent) == sorted((batch.pk, "succeeded") for batch in batches)


# --- delivery -------------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


async def callback_of(batch: BatchJob) -> BatchCallback:
    return await BatchCallback.objects.aget(batch_id=batch.pk)


@pytest.mark.django_db(transaction=True)
async def test_a_delivery_is_signed_retried_after_a_500_and_recorded_delivered(webhooks: Receiver) -> None:
    webhooks.script = [(500, {})]
    batch = await sync_to_async(finished_batch)(webhooks.url())
    sender, closed = CallbackSender(worker_id="test-sender"), asyncio.Event()
    running = asyncio.create_task(sender.run(closed))
    try:
        first, second = await asyncio.to_thread(webhooks.wait_for, 2)

        async def delivered() -> bool:
            return (await callback_of(batch)).status == CallbackStatus.DELIVERED

        await wait_until(delivered)
    finally:
        closed.set()
        await asyncio.wait_for(running, TIMEOUT)
    row = await callback_of(batch)
    assert (row.attempts, row.last_status_code, row.last_error, row.lease_owner) == (2, 200, "", "")
    assert row.delivered_at is not None
    for request in (first, second):
        assert request.path == "/hook"
        assert request.body == row.body.encode()
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-Batch-Signature"] == expected_signature(request.body)
        assert request.headers["X-Batch-Delivery"] == str(row.id)
    assert json.loads(first.body)["status"] == "succeeded"


@pytest.mark.django_db(transaction=True)
async def test_a_redirect_is_a_failed_attempt_and_is_not_followed(webhooks: Receiver) -> None:
    webhooks.script = [(302, {"Location": webhooks.url("/elsewhere")})]
    batch = await sync_to_async(finished_batch)(webhooks.url())
    assert await CallbackSender(worker_id="test-sender").deliver_due() == 1
    row = await callback_of(batch)
    assert (row.status, row.attempts, row.last_status_code) == (CallbackStatus.PENDING, 1, 302)
    assert "not followed" in row.last_error
    assert [request.path for request in webhooks.requests] == ["/hook"]


@pytest.mark.django_db(transaction=True)
async def test_a_host_no_longer_allowed_is_not_called_and_the_delivery_fails(webhooks: Receiver, settings: Any) -> None:
    batch = await sync_to_async(finished_batch)(webhooks.url())
    settings.BATCH_CALLBACK_ALLOWED_HOSTS = ["hooks.example.com"]
    assert await CallbackSender(worker_id="test-sender").deliver_due() == 1
    row = await callback_of(batch)
    assert (row.status, row.attempts, row.last_status_code) == (CallbackStatus.FAILED, 1, None)
    assert "BATCH_CALLBACK_ALLOWED_HOSTS" in row.last_error
    assert webhooks.requests == []


@pytest.mark.django_db(transaction=True)
async def test_a_delivery_gives_up_once_its_retry_window_has_passed(webhooks: Receiver, settings: Any) -> None:
    settings.BATCH_CALLBACK_RETRY_SECONDS = 0.0
    webhooks.script = [(503, {})]
    batch = await sync_to_async(finished_batch)(webhooks.url())
    assert await CallbackSender(worker_id="test-sender").deliver_due() == 1
    row = await callback_of(batch)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        CallbackStatus.FAILED,
        1,
        503,
        "HTTP 503 Service Unavailable",
    )
    assert await CallbackSender(worker_id="test-sender").deliver_due() == 0


@pytest.mark.django_db(transaction=True)
async def test_a_leased_delivery_is_not_claimed_by_another_worker(webhooks: Receiver) -> None:
    await sync_to_async(finished_batch)(webhooks.url())
    claim = sync_to_async(callbacks.claim_due)
    assert len(await claim(worker_id="a", limit=5, lease_seconds=60)) == 1
    assert await claim(worker_id="b", limit=5, lease_seconds=60) == []
    row = await BatchCallback.objects.aget()
    row.lease_expires_at = row.created_at  # the holder died: its lease ran out
    await row.asave(update_fields=["lease_expires_at"])
    assert [due.id for due in await claim(worker_id="b", limit=5, lease_seconds=60)] == [row.id]
    late = callbacks.Attempt(status_code=200)
    assert await sync_to_async(callbacks.record_attempt)(callback_id=row.id, worker_id="a", attempt=late) is None


# --- end to end: API, a real worker, the receiver, the API's and the admin's views ---------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_throttle")
async def test_end_to_end_with_a_real_worker(webhooks: Receiver, api_client: Any, admin_user: Any) -> None:
    webhooks.script = [(500, {})]
    body = {"handler": "demo.noop", "items": [{}] * 5, "callback_url": webhooks.url()}
    response = await sync_to_async(api_client.post)("/api/batches/", body, format="json")
    assert response.status_code == 201, response.content
    batch_id = response.json()["id"]
    config = WorkerConfig.from_settings(
        worker_id="test-e2e", handle_signals=False, poll_interval=0.05, heartbeat_seconds=0.5
    )
    worker = Worker(config)
    running = asyncio.create_task(worker.run())
    try:
        requests = await asyncio.to_thread(webhooks.wait_for, 2)

        async def delivered() -> bool:
            return await BatchCallback.objects.filter(batch_id=batch_id, status=CallbackStatus.DELIVERED).aexists()

        await wait_until(delivered)
    finally:
        worker.stop()
        await asyncio.wait_for(running, TIMEOUT)
    sent = json.loads(requests[1].body)
    assert (sent["id"], sent["status"], sent["succeeded_items"]) == (batch_id, "succeeded", 5)
    assert requests[1].headers["X-Batch-Signature"] == expected_signature(requests[1].body)
    listed = (await sync_to_async(api_client.get)(f"/api/batches/{batch_id}/callbacks/")).json()
    assert listed["count"] == 1
    delivery = listed["results"][0]
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 2, 200)
    assert delivery["url"] == webhooks.url() and delivery["delivered_at"] is not None

    def admin_pages() -> tuple[str, str]:
        client = Client()
        client.force_login(admin_user)
        page = client.get(f"/admin/batch/batchjob/{batch_id}/change/")
        listing = client.get("/admin/batch/batchcallback/")
        assert (page.status_code, listing.status_code) == (200, 200)
        return page.content.decode(), listing.content.decode()

    page, listing = await sync_to_async(admin_pages)()
    assert "completion webhook" in page.lower() and webhooks.url() in page
    assert webhooks.url() in listing


@pytest.mark.django_db
@pytest.mark.usefixtures("no_throttle")
def test_callbacks_of_a_batch_you_may_not_see_answer_404(
    webhooks: Receiver, client_for: Callable[[Any], Any], make_user: Callable[..., Any]
) -> None:
    batch = finished_batch(webhooks.url())
    other = client_for(make_user("bob"))
    assert_problem(other.get(f"/api/batches/{batch.pk}/callbacks/"), 404)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_runbatch_process_configured_from_the_environment_delivers_the_webhook(
    webhooks: Receiver, start_worker: Callable[..., Any]
) -> None:
    webhooks.script = [(500, {})]
    batch = services.submit_batch(handler="demo.noop", items=[{}] * 3, callback_url=webhooks.url()).batch
    worker = start_worker(
        env={
            "BATCH_CALLBACK_ALLOWED_HOSTS": f"localhost,127.0.0.1:{webhooks.port}",
            "BATCH_CALLBACK_SECRET": SECRET,
            "BATCH_CALLBACK_BACKOFF_SECONDS": "0.05",
        }
    )
    try:
        requests = webhooks.wait_for(2)
        deadline = time.monotonic() + TIMEOUT
        while (row := BatchCallback.objects.get(batch=batch)).status == CallbackStatus.PENDING:
            assert time.monotonic() < deadline and worker.poll() is None, worker_log(worker)
            time.sleep(0.01)  # the 200 was answered; its record follows within the worker's round
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=TIMEOUT) == 0, worker_log(worker)
    assert (row.status, row.attempts, row.last_status_code) == (CallbackStatus.DELIVERED, 2, 200), worker_log(worker)
    assert all(r.headers["X-Batch-Signature"] == expected_signature(r.body) for r in requests)
    assert json.loads(requests[1].body)["status"] == "succeeded"
