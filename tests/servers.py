"""A real `manage.py serve --no-worker` (daphne) on the test database, for findings that only a
real server shows (connections held across requests, sockets, origins)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log

    def request(
        self, method: str, path: str, *, token: str | None = None, body: Any = None, timeout: float = 60
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON body or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Accept": "application/json", "Host": "127.0.0.1"}
        if token:
            headers["Authorization"] = f"Token {token}"
        payload = None
        if body is not None:
            payload, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
        finally:
            conn.close()


def _wait_for_port(served: Served, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail(f"serve exited with {served.process.returncode}:\n{served.log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", served.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"serve did not listen within {timeout}s:\n{served.log.read_text()}")


@pytest.fixture
def serve(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """serve(**env): start `manage.py serve --no-worker` with extra environment; stopped after the test."""
    started: list[Served] = []

    def _start(**env: str) -> Served:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        environ = {key: value for key, value in worker_env.items() if key != "REDIS_URL"}
        environ.update({"DJANGO_DEBUG": "1", **env})
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "serve", "--no-worker", "--port", str(port)],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        served = Served(process, port, log)
        started.append(served)
        _wait_for_port(served)
        return served

    yield _start
    for served in started:
        if served.process.poll() is None:
            served.process.terminate()
            try:
                served.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                served.process.kill()
                served.process.wait(timeout=10)
