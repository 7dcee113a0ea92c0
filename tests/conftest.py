"""Shared fixtures. The database is whatever DATABASE_URL says (SQLite by default).

A test that needs a service this machine lacks (PostgreSQL, Redis, Chromium) skips with a
reason starting "needs service:"; with BATCH_REQUIRE_SERVICES=1 (set by .ci/run) such a skip
is turned into a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import SyncToAsync
from django.db import connections

from batch import services
from batch.models import BatchJob
from batch.selectors import counter_mismatches
from batchsite.env import current_database_url

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.servers"]  # the `serve` fixture: a real `manage.py serve`
SERVICE_SKIP = "needs service:"


def service_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from django.conf import settings

    db = settings.DATABASES["default"]
    is_postgres = db["ENGINE"] == "django.db.backends.postgresql"
    pg_down = is_postgres and not service_reachable(db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432))
    for item in items:
        if pg_down:
            item.add_marker(pytest.mark.skip(reason=f"{SERVICE_SKIP} PostgreSQL at {db.get('HOST')}:{db.get('PORT')}"))
        elif "postgres" in item.keywords and not is_postgres:
            item.add_marker(pytest.mark.skip(reason="PostgreSQL-only test; this run uses SQLite"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("BATCH_REQUIRE_SERVICES") == "1":
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if SERVICE_SKIP in reason:
            report.outcome = "failed"
            report.longrepr = f"BATCH_REQUIRE_SERVICES=1 but the test skipped: {reason}"


@pytest.fixture(autouse=True)
def _counter_invariant(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every database test: each batch's counters equal the aggregate of its items."""
    yield
    if request.node.get_closest_marker("django_db") is None:
        return
    broken = {str(b.pk): m for b in BatchJob.objects.all() if (m := counter_mismatches(b))}
    assert not broken, f"counter invariant broken: {broken}"


@pytest.fixture(autouse=True)
def _close_sync_thread_connection() -> Iterator[None]:
    """Async tests reach the database through asgiref's single sync thread; close that
    thread's connection afterwards so the test database can be flushed and dropped."""
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


@pytest.fixture
def no_throttle(settings: Any) -> Iterator[None]:
    """Submit, cancel and resize unthrottled (the throttles count in the default cache)."""
    from django.core.cache import cache

    settings.BATCH_SUBMIT_THROTTLE_RATE = ""
    settings.BATCH_CANCEL_THROTTLE_RATE = ""
    settings.BATCH_RESIZE_THROTTLE_RATE = ""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def submit() -> Callable[..., BatchJob]:
    """Submit a batch through the service: submit("demo.sleep", [{"seconds": 0}], max_parallel=2)."""

    def _submit(handler: str, items: list[Any], **kwargs: Any) -> BatchJob:
        return services.submit_batch(handler=handler, items=items, **kwargs).batch

    return _submit


# --- API clients (tests/test_api*.py, tests/test_admin.py) ------------------------------------


@pytest.fixture
def make_user(django_user_model: Any) -> Callable[..., Any]:
    """make_user("alice", is_staff=True): a user with password "pw"."""

    def _make(username: str, **extra: Any) -> Any:
        return django_user_model.objects.create_user(username=username, password="pw", **extra)

    return _make


def grant(who: Any, *codenames: str) -> None:
    """Give `who` batch permissions by codename (view_batchjob, cancel_batchjob, ...)."""
    from django.contrib.auth.models import Permission

    who.user_permissions.add(*Permission.objects.filter(codename__in=codenames, content_type__app_label="batch"))
    for cache_name in ("_perm_cache", "_user_perm_cache"):
        who.__dict__.pop(cache_name, None)


@pytest.fixture
def user(make_user: Callable[..., Any]) -> Any:
    return make_user("alice")


@pytest.fixture
def client_for() -> Callable[[Any], Any]:
    """client_for(user): a DRF APIClient sending that user's token (None: anonymous)."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def _client(who: Any) -> APIClient:
        client = APIClient(HTTP_ACCEPT="application/json")
        if who is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=who)[0].key}")
        return client

    return _client


@pytest.fixture
def api_client(client_for: Callable[[Any], Any], user: Any) -> Any:
    return client_for(user)


database_url_for_subprocess = current_database_url


@pytest.fixture
def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database_url_for_subprocess(),
            "BATCH_POLL_INTERVAL_SECONDS": "0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `manage.py runbatch` as a real process against the test database."""
    processes: list[subprocess.Popen[str]] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        log = (tmp_path / f"worker-{len(processes)}-{uuid.uuid4().hex[:6]}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "runbatch", "--progress", "never", *args],
            cwd=ROOT,
            env={**worker_env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        process.log_path = Path(log.name)  # type: ignore[attr-defined]
        processes.append(process)
        return process

    yield _start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def worker_log(process: subprocess.Popen[str]) -> str:
    return Path(process.log_path).read_text()  # type: ignore[attr-defined]
