"""WebSocket consumers through the real ASGI stack: session auth, origin check, snapshot, events."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from batch import services
from batch.models import BatchJob, BatchStatus, ItemStatus
from batchsite.asgi import application
from tests.conftest import SERVICE_SKIP, grant, service_reachable

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10
# A Redis database of its own, so these tests never see another project's channels.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def communicator(
    path: str, *, cookie: str | None = None, origin: str = "http://testserver", host: str = "testserver"
) -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode()), (b"host", host.encode())]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


@pytest.fixture
async def staff_cookie(make_user: Callable[..., Any]) -> str:
    user = await sync_to_async(make_user)("staff", is_staff=True)
    await sync_to_async(grant)(user, "view_batchjob")
    return await sync_to_async(session_cookie)(user)


@pytest.fixture
async def connected(staff_cookie: str) -> AsyncIterator[Callable[[str], Any]]:
    """connected(path): an accepted staff socket, disconnected after the test."""
    opened: list[WebsocketCommunicator] = []

    async def _open(path: str) -> WebsocketCommunicator:
        socket = communicator(path, cookie=staff_cookie)
        accepted, code = await asyncio.wait_for(socket.connect(), TIMEOUT)
        assert accepted, f"refused with {code}"
        opened.append(socket)
        return socket

    yield _open
    for socket in opened:
        await socket.disconnect()


async def receive_until(
    socket: WebsocketCommunicator, done: Callable[[dict[str, Any]], bool], *, timeout: float = TIMEOUT * 3
) -> list[dict[str, Any]]:
    """Every message up to and including the first for which `done` is true."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            messages.append(await socket.receive_json_from(timeout=timeout))
            if done(messages[-1]):
                return messages


def finished_as(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["type"] == "batch.updated" and m["batch"]["status"] == status


submit = sync_to_async(lambda handler, items, **kw: services.submit_batch(handler=handler, items=items, **kw).batch)


def _fail_first_item(batch_id: uuid.UUID) -> None:
    claimed = services.claim_items(batch_id=batch_id, worker_id="test", limit=1, lease_seconds=30)
    outcome = services.Outcome(item_id=claimed[0].id, status=ItemStatus.FAILED, error="ValueError: boom")
    services.complete_items(batch_id=batch_id, worker_id="test", outcomes=[outcome])


async def test_anonymous_handshake_is_refused() -> None:
    for path in ("/ws/batches/", f"/ws/batches/{uuid.uuid4()}/"):
        accepted, code = await asyncio.wait_for(communicator(path).connect(), TIMEOUT)
        assert (accepted, code) == (False, 4403)


async def test_non_staff_handshake_is_refused(make_user: Callable[..., Any]) -> None:
    user = await sync_to_async(make_user)("bob")
    cookie = await sync_to_async(session_cookie)(user)
    accepted, code = await asyncio.wait_for(communicator("/ws/batches/", cookie=cookie).connect(), TIMEOUT)
    assert (accepted, code) == (False, 4403)


async def test_foreign_origin_is_refused(staff_cookie: str) -> None:
    socket = communicator("/ws/batches/", cookie=staff_cookie, origin="http://evil.example")
    accepted, _ = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert not accepted


async def test_list_snapshot_holds_active_and_recent_batches(connected: Any) -> None:
    first = await submit("demo.noop", [{}] * 3, name="first")
    second = await submit("demo.sleep", [{"seconds": 1}], max_parallel=2)
    socket = await connected("/ws/batches/")
    snapshot = await socket.receive_json_from(timeout=TIMEOUT)
    assert snapshot["type"] == "snapshot"
    by_id = {b["id"]: b for b in snapshot["batches"]}
    assert [b["id"] for b in snapshot["batches"]][:2] == [str(second.pk), str(first.pk)]
    assert by_id[str(first.pk)]["name"] == "first"
    assert by_id[str(first.pk)]["total_items"] == 3
    assert by_id[str(first.pk)]["pending_items"] == 3
    assert by_id[str(second.pk)]["effective_parallel"] == 2
    assert by_id[str(second.pk)]["url"] == f"/api/batches/{second.pk}/"


async def test_batch_snapshot_holds_items_and_failures_with_their_error(connected: Any) -> None:
    batch = await submit("demo.noop", [{}] * 3)
    await sync_to_async(_fail_first_item)(batch.pk)
    socket = await connected(f"/ws/batches/{batch.pk}/")
    snapshot = await socket.receive_json_from(timeout=TIMEOUT)
    assert snapshot["type"] == "snapshot"
    assert snapshot["batch"]["failed_items"] == 1
    assert [(i["index"], i["status"], i["error"]) for i in snapshot["failures"]] == [(0, "failed", "ValueError: boom")]
    assert [i["index"] for i in snapshot["items"]] == [0]


async def test_unknown_batch_is_refused(staff_cookie: str) -> None:
    socket = communicator(f"/ws/batches/{uuid.uuid4()}/", cookie=staff_cookie)
    accepted, code = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert (accepted, code) == (False, 4404)


async def test_malformed_client_messages_do_not_break_the_socket(connected: Any) -> None:
    socket = await connected("/ws/batches/")
    await socket.receive_json_from(timeout=TIMEOUT)
    await socket.send_to(text_data="{not json")
    await socket.send_to(bytes_data=b"\x00\xff")
    await socket.send_json_to({"type": "unknown", "batch": 1})
    await socket.send_json_to([1, 2, 3])
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}


async def test_change_in_this_process_reaches_both_sockets(connected: Any) -> None:
    batch = await submit("demo.sleep", [{"seconds": 1}] * 4)
    everything = await connected("/ws/batches/")
    one = await connected(f"/ws/batches/{batch.pk}/")
    await everything.receive_json_from(timeout=TIMEOUT)
    await one.receive_json_from(timeout=TIMEOUT)
    await sync_to_async(services.request_cancel)(batch_id=batch.pk)
    for socket in (everything, one):
        last = (await receive_until(socket, finished_as(BatchStatus.CANCELLED)))[-1]["batch"]
        assert (last["id"], last["cancelled_items"], last["pending_items"]) == (str(batch.pk), 4, 0)


@pytest.fixture
def redis_layer(settings: Any) -> str:
    """Both this process and the worker subprocess on a Redis channel layer."""
    parsed = urlparse(TEST_REDIS_URL)
    if not service_reachable(parsed.hostname or "127.0.0.1", parsed.port or 6379):
        pytest.skip(f"{SERVICE_SKIP} Redis at {parsed.hostname}:{parsed.port or 6379} (set TEST_REDIS_URL)")
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [TEST_REDIS_URL]}}
    }
    return TEST_REDIS_URL


@pytest.mark.slow
async def test_events_from_a_runbatch_process_arrive_through_redis(
    redis_layer: str, connected: Any, start_worker: Callable[..., Any]
) -> None:
    batch = await submit("demo.sleep", [{"seconds": 0.05}] * 12, max_parallel=3)
    one = await connected(f"/ws/batches/{batch.pk}/")
    assert (await one.receive_json_from(timeout=TIMEOUT))["type"] == "snapshot"
    worker = start_worker("--batch", str(batch.pk), env={"REDIS_URL": redis_layer})
    messages = await receive_until(one, finished_as(BatchStatus.SUCCEEDED))
    assert messages[-1]["batch"]["succeeded_items"] == 12
    items = [m["item"] for m in messages if m["type"] == "item.updated"]
    assert items, "no item.updated arrived from the worker"
    assert {i["batch_id"] for i in items} == {str(batch.pk)}
    assert "succeeded" in {i["status"] for i in items}
    await asyncio.to_thread(worker.wait, TIMEOUT)
    assert await BatchJob.objects.filter(pk=batch.pk, status=BatchStatus.SUCCEEDED).aexists()


async def test_pause_and_resume_reach_both_sockets_with_the_lifecycle_fields(connected: Any) -> None:
    batch = await submit("demo.sleep", [{"seconds": 1}] * 3, max_failures=2, deadline_seconds=60)
    everything = await connected("/ws/batches/")
    one = await connected(f"/ws/batches/{batch.pk}/")
    await everything.receive_json_from(timeout=TIMEOUT)
    await one.receive_json_from(timeout=TIMEOUT)
    await sync_to_async(services.pause_batch)(batch_id=batch.pk)
    for socket in (everything, one):
        paused = (await receive_until(socket, finished_as(BatchStatus.PAUSED)))[-1]["batch"]
        assert (paused["max_failures"], paused["deadline_seconds"], paused["retry_of"]) == (2, 60, None)
        assert "status_reason" in paused
    await sync_to_async(services.resume_batch)(batch_id=batch.pk)
    for socket in (everything, one):
        resumed = (await receive_until(socket, finished_as(BatchStatus.PENDING)))[-1]["batch"]
        assert (resumed["id"], resumed["pending_items"]) == (str(batch.pk), 3)


def _finish_with_one_failure(batch_id: uuid.UUID) -> None:
    _fail_first_item(batch_id)
    services.request_cancel(batch_id=batch_id)


async def test_a_retry_batch_appears_on_the_list_socket_with_retry_of(connected: Any) -> None:
    original = await submit("demo.noop", [{}] * 3)
    await sync_to_async(_finish_with_one_failure)(original.pk)
    everything = await connected("/ws/batches/")
    snapshot = await everything.receive_json_from(timeout=TIMEOUT)
    assert [b["status"] for b in snapshot["batches"]] == ["cancelled"]
    result = await sync_to_async(services.retry_batch)(batch_id=original.pk, include=["failed", "cancelled"])
    assert result.batch is not None
    messages = await receive_until(everything, lambda m: m["type"] == "batch.updated" and m["batch"]["retry_of"])
    retry = messages[-1]["batch"]
    assert (retry["id"], retry["retry_of"], retry["total_items"], retry["status"]) == (
        str(result.batch.pk),
        str(original.pk),
        3,
        "pending",
    )
    one = await connected(f"/ws/batches/{result.batch.pk}/")  # a retry's own snapshot serializes too
    assert (await one.receive_json_from(timeout=TIMEOUT))["batch"]["retry_of"] == str(original.pk)
