"""How the scenarios submit and cancel: through the REST API (a real ASGI server), or services."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from batch import services
from batch.models import BatchJob, BatchStatus
from bench import harness
from bench.harness import database_url

# The suite submits and cancels faster than the default per-user throttles allow.
UNTHROTTLED = {
    "BATCH_SUBMIT_THROTTLE_RATE": "",
    "BATCH_CANCEL_THROTTLE_RATE": "",
}
PRODUCTION_ENV = {
    "DJANGO_DEBUG": "0",
    "BATCH_DEMO_HANDLERS": "1",  # they run demo.* handlers
    "DJANGO_SECRET_KEY": "bench-" + "x" * 50,
    "DJANGO_LOG_LEVEL": "WARNING",
    "DJANGO_SECURE_SSL_REDIRECT": "0",  # plain HTTP on localhost (production redirects to HTTPS)
}


class Client(Protocol):
    via: str

    def submit(self, handler: str, items: list[dict[str, Any]], max_parallel: int) -> uuid.UUID: ...

    def cancel(self, batch_id: uuid.UUID) -> str:
        """Request the cancel and return once the batch is `cancelled`; the final status."""
        ...


class ServiceClient:
    """`services.submit_batch`, and `services.request_cancel` + polling until `cancelled`."""

    via = "services"

    def submit(self, handler: str, items: list[dict[str, Any]], max_parallel: int) -> uuid.UUID:
        return services.submit_batch(handler=handler, items=items, max_parallel=max_parallel).batch.id

    def cancel(self, batch_id: uuid.UUID, timeout: float = 30.0) -> str:
        result = services.request_cancel(batch_id=batch_id)
        deadline = time.monotonic() + timeout
        status = result.batch.status if result.batch else "missing"
        while status == BatchStatus.CANCELLING and time.monotonic() < deadline:
            time.sleep(0.002)
            status = BatchJob.objects.values_list("status", flat=True).get(pk=batch_id)
        return str(status)


class ApiClient:
    """`POST /api/batches/` and `DELETE /api/batches/{id}/` against a daphne subprocess."""

    via = "REST API (daphne, DJANGO_DEBUG=0)"

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Token {token}", "Accept": "application/json"}

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")

    def submit(self, handler: str, items: list[dict[str, Any]], max_parallel: int) -> uuid.UUID:
        code, body = self._request(
            "POST", "/api/batches/", {"handler": handler, "items": items, "max_parallel": max_parallel}
        )
        if code != 201:
            raise RuntimeError(f"submit answered {code}: {body}")
        return uuid.UUID(body["id"])

    def cancel(self, batch_id: uuid.UUID) -> str:
        code, body = self._request("DELETE", f"/api/batches/{batch_id}/")
        if code != 200:
            raise RuntimeError(f"cancel answered {code}: {body}")
        return str(body["status"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _token() -> str:
    from django.contrib.auth.models import User
    from rest_framework.authtoken.models import Token

    user, _ = User.objects.get_or_create(username="bench")
    user.is_staff = user.is_superuser = True  # sees and cancels every batch
    user.save(update_fields=["is_staff", "is_superuser"])
    return Token.objects.get_or_create(user=user)[0].key


@contextlib.contextmanager
def service_client() -> Iterator[ServiceClient]:
    yield ServiceClient()


@contextlib.contextmanager
def api_client(timeout: float = 60.0) -> Iterator[ApiClient]:
    """A daphne server on a free port against this database, and a staff user's token."""
    port = _free_port()
    env = {**os.environ, **PRODUCTION_ENV, "DATABASE_URL": database_url(), **UNTHROTTLED}
    env.pop("DATABASE_TEST_NAME", None)
    log = Path(tempfile.mkdtemp(prefix="bench-api-")) / "daphne.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "batchsite.asgi:application"],
            cwd=harness.WORKER_ROOT,  # `-m daphne` imports batchsite from its working directory
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, server, log, timeout)
        yield ApiClient(f"http://127.0.0.1:{port}", _token())
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_port(port: int, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"API server exited:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"API server not listening on {port} after {timeout} s")
