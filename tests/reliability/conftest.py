"""A live ASGI server (`manage.py serve --no-worker`, production settings) against the test database."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

PRODUCTION = {
    "DJANGO_DEBUG": "0",
    "BATCH_DEMO_HANDLERS": "1",  # they run demo.* handlers
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_SECURE_PROXY_SSL_HEADER": "1",  # as behind a TLS proxy: clients send X-Forwarded-Proto
    "BATCH_SUBMIT_THROTTLE_RATE": "",
    "BATCH_CANCEL_THROTTLE_RATE": "",
    "DJANGO_LOG_LEVEL": "WARNING",
}
WEB_APP_NAME = "batch-web-" + secrets.token_hex(4)  # libpq's PGAPPNAME: find the server's connections


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Api:
    """A tiny HTTP client for one user (token), counting every request it makes."""

    base: str
    token: str | None
    counter: list[int] = field(default_factory=lambda: [0])
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 60, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, str]:
        headers = {"Accept": "application/json", "X-Forwarded-Proto": "https", **(headers or {})}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with self.lock:
            self.counter[0] += 1
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null"), response.headers["Content-Type"]
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null"), error.headers["Content-Type"]


@dataclass
class LiveServer:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, token: str | None, counter: list[int] | None = None) -> Api:
        return Api(self.base, token, counter if counter is not None else [0])


def _wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # answering (503: no worker yet) is ready enough
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"server not ready after {timeout}s: {log.read_text()[-3000:]}")


@pytest.fixture
def asgi_server(worker_env: dict[str, str], tmp_path: Path) -> Iterator[LiveServer]:
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "serve", "--no-worker", "--port", str(port)],
            cwd=ROOT,
            env={**worker_env, **PRODUCTION, "PGAPPNAME": WEB_APP_NAME},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server.base, process, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
