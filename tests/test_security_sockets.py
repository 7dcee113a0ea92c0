"""Security round 2 (issue 15), WebSockets: the origin check compares scheme, host and port;
non-staff users are refused even with `view_batchjob`; a socket closes on logout and when the
permission is taken away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission

from batch import services
from batch.models import BatchJob
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


# --- 5. subscriptions end with the session and with the permission ------------------------------------


async def closed_code(socket: Any, *, timeout: float = TIMEOUT) -> int:
    """Read until the server closes the socket; returns the close code."""
    async with asyncio.timeout(timeout):
        while True:
            message = await socket.receive_output(timeout=timeout)
            if message["type"] == "websocket.close":
                return int(message.get("code", 1000))


def logout(cookie: str) -> int:
    from django.test import Client

    client = Client()
    client.cookies["sessionid"] = cookie
    return int(client.post("/admin/logout/").status_code)


@pytest.mark.parametrize("path", ["/ws/batches/", "/ws/batches/{id}/"])
async def test_socket_closes_at_once_on_logout(make_user: Any, settings: Any, path: str) -> None:
    settings.BATCH_WS_RECHECK_SECONDS = 3600  # the logout itself must close it, not the periodic check
    user = await watcher(make_user)
    batch = await sync_to_async(lambda: services.submit_batch(handler="demo.noop", items=[{}]).batch)()
    cookie = await sync_to_async(session_cookie)(user)
    socket = communicator(path.format(id=batch.pk), cookie=cookie)
    connected, _ = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert connected
    assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "snapshot"
    assert await sync_to_async(logout)(cookie) in (200, 302)
    assert await closed_code(socket) == 4403


async def test_logout_of_one_session_leaves_the_users_other_sessions_open(make_user: Any, settings: Any) -> None:
    settings.BATCH_WS_RECHECK_SECONDS = 3600
    user = await watcher(make_user)
    first = await sync_to_async(session_cookie)(user)
    second = await sync_to_async(session_cookie)(user)
    sockets = [communicator("/ws/batches/", cookie=cookie) for cookie in (first, second)]
    for socket in sockets:
        assert (await asyncio.wait_for(socket.connect(), TIMEOUT))[0]
        await socket.receive_json_from(timeout=TIMEOUT)
    await sync_to_async(logout)(first)
    assert await closed_code(sockets[0]) == 4403
    await sockets[1].send_json_to({"type": "ping"})
    assert (await sockets[1].receive_json_from(timeout=TIMEOUT)) == {"type": "pong"}
    await sockets[1].disconnect()


@pytest.mark.parametrize("change", ["permission", "group", "staff", "inactive"])
async def test_socket_closes_within_the_recheck_interval_when_access_is_taken_away(
    make_user: Any, settings: Any, change: str
) -> None:
    from django.contrib.auth.models import Group

    settings.BATCH_WS_RECHECK_SECONDS = 0.2
    user = await sync_to_async(make_user)("watcher", is_staff=True)
    operators = await sync_to_async(Group.objects.create)(name="operators")
    view = await sync_to_async(Permission.objects.get)(codename="view_batchjob")
    if change == "group":
        await sync_to_async(operators.permissions.add)(view)
        await sync_to_async(user.groups.add)(operators)
    else:
        await sync_to_async(grant)(user, "view_batchjob")
    socket = communicator("/ws/batches/", cookie=await sync_to_async(session_cookie)(user))
    assert (await asyncio.wait_for(socket.connect(), TIMEOUT))[0]
    await socket.receive_json_from(timeout=TIMEOUT)

    def take_away() -> None:
        if change == "permission":
            user.user_permissions.clear()
        elif change == "group":
            operators.permissions.clear()
        else:
            setattr(user, "is_staff" if change == "staff" else "is_active", False)
            user.save()

    await sync_to_async(take_away)()
    other = await sync_to_async(make_user)("other")
    await sync_to_async(services.submit_batch)(handler="demo.noop", items=[{}], created_by=other)
    assert await closed_code(socket, timeout=5) == 4403
    assert await sync_to_async(BatchJob.objects.count)() == 1


async def test_socket_with_access_stays_open_across_rechecks(make_user: Any, settings: Any) -> None:
    settings.BATCH_WS_RECHECK_SECONDS = 0.05
    socket = communicator("/ws/batches/", cookie=await sync_to_async(session_cookie)(await watcher(make_user)))
    assert (await asyncio.wait_for(socket.connect(), TIMEOUT))[0]
    await socket.receive_json_from(timeout=TIMEOUT)
    await asyncio.sleep(0.5)  # about ten rechecks: each must keep the socket
    await socket.send_json_to({"type": "ping"})
    assert (await socket.receive_json_from(timeout=TIMEOUT)) == {"type": "pong"}
    await socket.disconnect()
