"""Security round 2 (issue 15), WebSockets: the origin check compares scheme, host and port;
non-staff users are refused even with `view_batchjob`; a socket closes on logout and when the
permission is taken away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from batch import services
from tests.conftest import grant
from tests.test_consumers import TIMEOUT, communicator, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


async def watcher(make_user: Any, username: str = "watcher", **extra: Any) -> Any:
    user = await sync_to_async(make_user)(username, is_staff=True, **extra)
    await sync_to_async(grant)(user, "view_batchjob")
    return user


# --- 9. origin: scheme, host and port ------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "accepted"),
    [
        ("http://testserver", "testserver", True),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("http://127.0.0.1:1", "127.0.0.1:8000", False),  # another port on the same host
        ("https://127.0.0.1:8000", "127.0.0.1:8000", False),  # another scheme
        ("http://127.0.0.1", "127.0.0.1:8000", False),  # the default port is another port
        ("http://localhost:8000", "127.0.0.1:8000", False),  # an allowed host, but not this one
        ("http://evil.example", "evil.example", False),  # not an allowed host
        ("null", "testserver", False),
    ],
)
async def test_websocket_origin_must_match_scheme_host_and_port(
    make_user: Any, origin: str, host: str, accepted: bool
) -> None:
    cookie = await sync_to_async(session_cookie)(await watcher(make_user))
    socket = communicator("/ws/batches/", cookie=cookie, origin=origin, host=host)
    connected, _ = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert connected is accepted
    await socket.disconnect()


async def test_trusted_origin_is_accepted(make_user: Any, settings: Any) -> None:
    settings.CSRF_TRUSTED_ORIGINS = ["https://batch.example.com"]
    cookie = await sync_to_async(session_cookie)(await watcher(make_user))
    socket = communicator("/ws/batches/", cookie=cookie, origin="https://batch.example.com", host="testserver")
    connected, _ = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert connected
    await socket.disconnect()


# --- tests the suite lacked: non-staff with view_batchjob ---------------------------------------------


@pytest.mark.parametrize("path", ["/ws/batches/", "/ws/batches/{id}/"])
async def test_non_staff_user_with_view_permission_is_refused(make_user: Any, path: str) -> None:
    user = await sync_to_async(make_user)("viewer")  # not staff
    await sync_to_async(grant)(user, "view_batchjob")
    batch = await sync_to_async(lambda: services.submit_batch(handler="demo.noop", items=[{}]).batch)()
    socket = communicator(path.format(id=batch.pk), cookie=await sync_to_async(session_cookie)(user))
    connected, code = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert (connected, code) == (False, 4403)
