"""WebSocket fuzz: malformed, binary, huge and unknown frames neither crash the consumer nor leak batches.

After every bad frame the same socket still answers a ping, so the consumer survived it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from batch.models import BatchJob
from tests.conftest import grant
from tests.test_consumers import communicator, session_cookie

TIMEOUT = 10

BAD_TEXT_FRAMES = [
    " ",
    "{",
    "null",
    "[]",
    '"ping"',
    "1e400",
    "NaN",
    '{"type": null}',
    '{"type": ["ping"]}',
    '{"type": "subscribe", "batch": "00000000-0000-0000-0000-000000000000"}',
    '{"type": "batch.updated", "batch": {"id": "x"}}',
    '{"type": "batch_items", "items": [1, 2]}',
    '{"type": "websocket.disconnect"}',
    '{"type": "ping", "type": "snapshot"}',
    "\x00\x01\x02",
    "[" * 100_000 + "]" * 100_000,  # deeper than Python's JSON decoder can recurse
    json.dumps({"type": "x" * 1_000_000}),  # a megabyte
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
]
BAD_BINARY_FRAMES = [b"\x00" * 1024, b"\xff\xfe\xfd", json.dumps({"type": "ping"}).encode(), b"x" * 1_000_000]


@pytest.fixture
async def batches(make_user: Callable[..., Any], submit: Any) -> dict[str, BatchJob]:
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    return {
        "alice": await sync_to_async(submit)("demo.sleep", [{"seconds": 1}], created_by=alice, name="alice-b"),
        "bob": await sync_to_async(submit)("demo.sleep", [{"seconds": 1}], created_by=bob, name="bob-b"),
    }


@pytest.fixture
async def watcher(make_user: Callable[..., Any]) -> str:
    who = await sync_to_async(make_user)("watcher", is_staff=True)
    await sync_to_async(grant)(who, "view_batchjob")
    return await sync_to_async(session_cookie)(who)


@pytest.fixture
async def socket(watcher: str, batches: dict[str, BatchJob]) -> AsyncIterator[WebsocketCommunicator]:
    ws = communicator(f"/ws/batches/{batches['alice'].pk}/", cookie=watcher)
    accepted, code = await asyncio.wait_for(ws.connect(), TIMEOUT)
    assert accepted, code
    snapshot = await asyncio.wait_for(ws.receive_json_from(), TIMEOUT)
    assert snapshot["batch"]["id"] == str(batches["alice"].pk)
    yield ws
    await ws.disconnect()


async def assert_alive(ws: WebsocketCommunicator, forbidden: str) -> None:
    """Only a pong comes back: no error frame, no close, nothing about another batch."""
    await ws.send_json_to({"type": "ping"})
    reply = await asyncio.wait_for(ws.receive_output(), TIMEOUT)
    assert reply["type"] == "websocket.send", reply
    assert json.loads(reply["text"]) == {"type": "pong"}
    assert forbidden not in reply["text"]


@pytest.mark.django_db(transaction=True)
async def test_bad_text_frames_do_not_crash_the_consumer(
    socket: WebsocketCommunicator, batches: dict[str, BatchJob]
) -> None:
    for frame in BAD_TEXT_FRAMES:
        await socket.send_to(text_data=frame)
        await assert_alive(socket, str(batches["bob"].pk))


@pytest.mark.django_db(transaction=True)
async def test_binary_frames_do_not_crash_the_consumer(
    socket: WebsocketCommunicator, batches: dict[str, BatchJob]
) -> None:
    for frame in BAD_BINARY_FRAMES:
        await socket.send_to(bytes_data=frame)
        await assert_alive(socket, str(batches["bob"].pk))


@pytest.mark.django_db(transaction=True)
async def test_non_viewers_are_refused_on_every_path(
    make_user: Callable[..., Any], batches: dict[str, BatchJob]
) -> None:
    """Alice (no permission) cannot watch even her own batch on the staff socket, nor Bob's."""
    alice = await sync_to_async(lambda: batches["alice"].created_by)()
    cookie = await sync_to_async(session_cookie)(alice)
    for path in ("/ws/batches/", f"/ws/batches/{batches['alice'].pk}/", f"/ws/batches/{batches['bob'].pk}/"):
        for who in (cookie, None, "forged-session-key"):
            ws = communicator(path, cookie=who)
            accepted, code = await asyncio.wait_for(ws.connect(), TIMEOUT)
            assert (accepted, code) == (False, 4403), (path, who)


@pytest.mark.django_db(transaction=True)
async def test_unknown_batch_and_foreign_origin_are_refused(watcher: str) -> None:
    ws = communicator("/ws/batches/00000000-0000-0000-0000-000000000000/", cookie=watcher)
    accepted, code = await asyncio.wait_for(ws.connect(), TIMEOUT)
    assert (accepted, code) == (False, 4404)
    for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
        ws = communicator("/ws/batches/", cookie=watcher, origin=origin)
        accepted, _ = await asyncio.wait_for(ws.connect(), TIMEOUT)
        assert not accepted, origin
