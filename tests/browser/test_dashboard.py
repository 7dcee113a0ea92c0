"""The live dashboard in headless Chromium, against `manage.py serve` (embedded default: one
process, in-memory channel layer, worker inside): submit, watch, resize, cancel, pause, resume,
retry failed items, and what a user without the permissions is offered.

Needs Debian's `chromium` (/usr/bin/chromium); Playwright drives it, no browser download.
The mid-run screenshots land in artifacts/ (kept by CI).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db.backends.signals import connection_created

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from tests.conftest import ROOT, SERVICE_SKIP, grant

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = ROOT / "artifacts"
TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[str], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"serve did not listen on {port} within {timeout}s:\n{log.read_text()}")


class Server:
    """`manage.py serve` (daphne + worker in one process) on a free port, on the test database."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.port = env, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        wait_for_port(self.port, self.process, self.log)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def server(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    env = {key: value for key, value in worker_env.items() if key != "REDIS_URL"}  # the embedded default
    server = Server(env, tmp_path / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(server: Server, django_user_model: Any) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{SERVICE_SKIP} Chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900}, base_url=server.url)
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def login(page: Any, username: str = "admin") -> None:
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw")
    page.click("input[type=submit]")
    page.click("#batch-dashboard-module a.section")  # the link on the admin index
    page.wait_for_selector("[data-conn][data-state=live]")


def submit_batch(page: Any, *, name: str, params: str, count: int = 1) -> Any:
    page.select_option("#bd-handler", "demo.sleep")
    page.fill("#bd-params", params)
    page.fill("#bd-count", str(count))
    page.fill("#bd-max-parallel", "4")
    page.fill("#bd-name", name)
    page.evaluate("document.querySelector('[data-submit-result]').className = ''")
    page.click("input[value='Submit batch']")
    page.wait_for_selector("[data-submit-result].bd-ok")
    return page.locator("[data-batches] tr", has_text=name)


def wait_for_status(page: Any, row: Any, status: str) -> None:
    page.wait_for_function(
        "([row, status]) => row.querySelector('[data-field=status]').textContent === status",
        arg=[row.element_handle(), status],
    )


def finished(row: Any) -> int:
    return int(row.locator("[data-field=bar]").get_attribute("aria-valuenow") or 0)


def test_dashboard_shows_progress_live_and_resizes_and_cancels(page: Any, server: Server) -> None:
    login(page)
    page.evaluate("window.__sameDocument = true")
    mixed = [{"seconds": 0.05, "fail": index % 5 == 0} for index in range(30)]
    wait_for_status(page, submit_batch(page, name="mixed results", params=json.dumps(mixed)), "failed")
    row = submit_batch(page, name="browser test", params='{"seconds": 0.6}', count=120)
    page.wait_for_function(
        "row => Number(row.querySelector('[data-field=bar]').getAttribute('aria-valuenow')) >= 8"
        " && row.querySelector('.bd-seg-running')",
        arg=row.element_handle(),
    )
    first = finished(row)
    page.wait_for_function(
        "([row, seen]) => Number(row.querySelector('[data-field=bar]').getAttribute('aria-valuenow')) > seen",
        arg=[row.element_handle(), first],
    )
    assert row.locator("[data-field=status]").inner_text().lower() == "running"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(ARTIFACTS / "dashboard-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")

    assert row.locator("[data-field=effective]").inner_text() == "4"
    row.locator("input[type=range]").fill("2")
    # Both settle on the new value; an update read just before the resize may still arrive in
    # between (its `updated_at` can fall in the resize's millisecond, which the page's staleness
    # check does not see finer than), and the next one corrects it.
    page.wait_for_function(
        "row => row.querySelector('[data-field=effective]').textContent === '2'"
        " && row.querySelector('[data-field=requested]').textContent === '2 requested'",
        arg=row.element_handle(),
    )

    row.locator("button.bd-cancel").click()
    dialog = page.locator("[data-cancel-dialog]")
    assert dialog.is_visible()
    dialog.locator("[data-cancel-drain]").fill("20")
    dialog.locator("[data-cancel-confirm]").click()
    result = dialog.locator("[data-cancel-result][data-kind=ok]")
    result.wait_for()
    assert result.inner_text().startswith("Cancelled.")
    dialog.locator("[data-cancel-close]").click()
    wait_for_status(page, row, "cancelled")
    assert page.evaluate("window.__sameDocument") is True  # live updates, never a reload
    assert page.locator("[data-conn]").get_attribute("data-state") == "live"

    server.stop()
    page.wait_for_selector("[data-conn][data-state=offline]")
    assert "reconnecting" in page.locator("[data-conn]").inner_text()
    server.start()
    page.wait_for_selector("[data-conn][data-state=live]")

    row.locator("[data-field=title]").click()
    page.wait_for_selector("[data-items] tr[data-status]")
    page.screenshot(path=str(ARTIFACTS / "dashboard-batch.png"), full_page=True)
    assert page.locator("[data-batch-card] [data-field=status]").inner_text().lower() == "cancelled"


def seconds_of(text: str) -> float:
    value, unit = text.split()
    return float(value) / 1000 if unit == "ms" else float(value)


def test_charts_plot_throughput_and_item_durations_mid_run(page: Any) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    login(page)
    row = submit_batch(page, name="charted", params='{"seconds": 0.3}', count=240)
    overview_points = "document.querySelectorAll('[data-chart=overview-rate] circle.bd-pt').length"
    page.wait_for_function(f"{overview_points} >= 3")
    assert row.locator("[data-field=status]").inner_text().lower() == "running"
    assert float(page.locator("[data-field=overall-rate]").inner_text().split()[0]) > 0  # items/s, all batches
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # nothing runs off at 1280 px
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-charts.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(ARTIFACTS / "dashboard-charts-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")

    row.locator("[data-field=title]").click()
    page.wait_for_selector("[data-conn][data-state=live]")
    page.wait_for_function(
        "document.querySelectorAll('[data-chart=rate] circle.bd-pt').length >= 2"
        " && document.querySelectorAll('[data-chart=durations] rect.bd-hbar').length > 0"
    )
    card_status = page.locator("[data-batch-card] [data-field=status]")
    assert card_status.inner_text().lower() == "running"
    bars = page.locator("[data-chart=durations] rect.bd-hbar").count()
    assert bars > 0
    assert page.locator("[data-chart=durations] .bd-q-p50").count() == 1
    assert page.locator("[data-chart=durations] .bd-q-p95").count() == 1
    p50, p95 = (seconds_of(page.locator(f"[data-field={q}]").inner_text()) for q in ("p50", "p95"))
    assert 0.25 <= p50 <= p95 < 2.0  # the items sleep 0.3 s each
    assert int(page.locator("[data-field=sampled]").inner_text().replace(",", "")) > 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    page.screenshot(path=str(ARTIFACTS / "dashboard-batch-charts.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(ARTIFACTS / "dashboard-batch-charts-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")
    page.wait_for_function("document.querySelector('[data-batch-card] [data-field=status]').textContent == 'succeeded'")
    # Every item finished after the page opened counts (batch.updated's recent_durations), not
    # only the 20 item events per flush: with the snapshot's 50, well over 100 of the 240.
    assert int(page.locator("[data-field=sampled]").inner_text().replace(",", "")) >= 100

    page.goto("/admin/batch/batchjob/")  # the changelist's columns fit 1280 px (no sideways scroll)
    results = page.locator("#changelist .results")
    assert results.evaluate("node => node.scrollWidth <= node.clientWidth + 1")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    page.screenshot(path=str(ARTIFACTS / "changelist.png"), full_page=True)


def wait_until(condition: Any, *, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def row_of(page: Any, batch_id: object) -> Any:
    return page.locator(f'[data-batches] tr[data-id="{batch_id}"]')


@pytest.fixture
def orm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The ORM in the test body: Playwright's sync API runs an event loop in this thread, which
    Django's async-safety check takes for async code (the documented opt-out, tests only). The
    body's queries run in another context than the fixtures (a connection of their own): it is
    closed here, or PostgreSQL could not drop the test database."""
    opened: list[Any] = []

    def record(sender: Any, connection: Any, **kwargs: Any) -> None:
        opened.append(connection)

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    connection_created.connect(record, weak=False)
    try:
        yield
    finally:
        connection_created.disconnect(record)
        for wrapper in opened:
            wrapper.close()


def started_items(batch_id: object) -> int:
    """Items that ever started (running or finished): a paused batch must not add any."""
    return BatchJobItem.objects.filter(batch_id=batch_id).exclude(status=ItemStatus.PENDING).count()


@pytest.mark.usefixtures("orm")
def test_dashboard_pauses_resumes_and_retries_failed_items(page: Any) -> None:
    login(page)
    row = submit_batch(page, name="pausable", params='{"seconds": 0.4}', count=48)
    batch = BatchJob.objects.get(name="pausable")
    page.wait_for_function(
        "row => Number(row.querySelector('[data-field=bar]').getAttribute('aria-valuenow')) >= 4"
        " && row.querySelector('.bd-seg-running')",
        arg=row.element_handle(),
    )
    assert row.locator("button.bd-resume").is_hidden()
    row.locator("button.bd-pause").click()
    dialog = page.locator("[data-pause-dialog]")
    assert dialog.is_visible()
    assert "items already running finish" in dialog.inner_text()
    dialog.locator("[data-pause-drain]").fill("20")
    dialog.locator("[data-pause-confirm]").click()
    dialog.locator("[data-pause-result][data-kind=ok]").wait_for()
    assert dialog.locator("[data-pause-result]").inner_text().startswith("Paused.")
    dialog.locator("[data-pause-close]").click()
    wait_for_status(page, row, "paused")
    assert row.locator("button.bd-pause").is_hidden() and row.locator("button.bd-resume").is_visible()

    batch.refresh_from_db()
    assert (batch.status, batch.running_items) == (BatchStatus.PAUSED, 0)
    started = started_items(batch.pk)
    assert 4 <= started < 48
    # A negative: watch for 1.5 s (15 worker polls) that no item of the paused batch starts.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert started_items(batch.pk) == started
        time.sleep(0.1)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-paused.png"), full_page=True)

    row.locator("button.bd-resume").click()
    wait_for_status(page, row, "running")
    assert row.locator("button.bd-pause").is_visible() and row.locator("button.bd-resume").is_hidden()
    wait_for_status(page, row, "succeeded")
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items) == (BatchStatus.SUCCEEDED, 48)
    assert row.locator("button.bd-retry").is_hidden()  # nothing failed

    mixed = [{"seconds": 0.05, "fail": index % 4 == 0} for index in range(12)]
    failing = submit_batch(page, name="flaky", params=json.dumps(mixed))
    wait_for_status(page, failing, "failed")
    original = BatchJob.objects.get(name="flaky")
    failing.locator("button.bd-retry").click()
    retry = page.locator("[data-retry-dialog]")
    assert retry.is_visible()
    assert retry.locator("[data-retry-count]").inner_text() == "3 failed items"
    assert retry.locator("[data-retry-cancelled-row]").is_hidden()  # nothing was cancelled
    retry.locator("[data-retry-confirm]").click()
    retry.locator("[data-retry-result][data-kind=ok]").wait_for()
    page.screenshot(path=str(ARTIFACTS / "dashboard-retry-dialog.png"))

    again = BatchJob.objects.get(retry_of=original)
    items = list(again.items.order_by("index").values_list("index", "source_index", "params"))
    failed_params = dict(original.items.filter(status=ItemStatus.FAILED).values_list("index", "params"))
    assert sorted(failed_params) == [0, 4, 8]
    assert items == [(n, source, failed_params[source]) for n, source in enumerate([0, 4, 8])]
    row_of(page, again.pk).wait_for()  # the list page shows the new batch at once
    link = retry.locator("[data-retry-link]")
    assert link.get_attribute("href") == f"/admin/batch/dashboard/{again.pk}/"
    link.click()
    page.wait_for_url(f"**/admin/batch/dashboard/{again.pk}/")
    page.wait_for_selector("[data-conn][data-state=live]")
    card = page.locator("[data-batch-card]")
    assert card.locator("[data-field=retryof] a").get_attribute("href") == f"/admin/batch/dashboard/{original.pk}/"
    page.wait_for_function("document.querySelector('[data-batch-card] [data-field=status]').textContent == 'failed'")
    assert card.locator("button.bd-retry").is_visible()  # its items fail again: it can be retried in turn
    for kind in ("jsonl", "csv"):
        href = card.locator(f"a[data-export={kind}]").get_attribute("href")
        assert href == f"/api/batches/{again.pk}/export/?as={kind}"


@pytest.mark.usefixtures("orm")
def test_user_without_the_permissions_sees_no_lifecycle_buttons(page: Any, django_user_model: Any) -> None:
    admin = django_user_model.objects.get(username="admin")
    paused = services.submit_batch(handler="demo.sleep", items=[{"seconds": 0.2}] * 3, created_by=admin).batch
    services.pause_batch(batch_id=paused.pk)
    failed = services.submit_batch(handler="demo.sleep", items=[{"seconds": 0, "fail": True}], created_by=admin).batch
    wait_until(lambda: BatchJob.objects.get(pk=failed.pk).status == BatchStatus.FAILED, what="a failed batch")
    login(page)  # the superuser is offered them: the watcher's empty page below is no accident
    page.goto("/admin/batch/dashboard/")
    row_of(page, failed.pk).locator("button.bd-retry:visible").wait_for()
    assert row_of(page, paused.pk).locator("button.bd-resume").is_visible()

    watcher = django_user_model.objects.create_user("watcher", password="pw", is_staff=True)
    grant(watcher, "view_batchjob")
    other = page.context.browser.new_context(base_url=page.url.split("/admin")[0])
    try:
        watching = other.new_page()
        login(watching, "watcher")
        for batch, status in ((paused, "paused"), (failed, "failed")):
            wait_for_status(watching, row_of(watching, batch.pk), status)
        assert watching.locator("[data-batches] button:visible").count() == 0
        watching.goto(f"/admin/batch/dashboard/{failed.pk}/")
        watching.wait_for_function(
            "document.querySelector('[data-batch-card] [data-field=status]').textContent == 'failed'"
        )
        assert watching.locator("[data-batch-card] button:visible").count() == 0
        assert watching.locator("[data-batch-card] a[data-export=csv]").is_visible()  # viewing is enough
    finally:
        other.close()
    services.request_cancel(batch_id=paused.pk)


@pytest.mark.usefixtures("orm")
def test_retry_dialog_can_include_the_cancelled_items(page: Any) -> None:
    login(page)
    params = [{"seconds": 0, "fail": True}] + [{"seconds": 5}] * 9
    row = submit_batch(page, name="stopped", params=json.dumps(params))
    page.wait_for_function(
        "row => row.querySelector('[data-field=failed]').textContent === '1'", arg=row.element_handle()
    )
    original = BatchJob.objects.get(name="stopped")
    services.request_cancel(batch_id=original.pk)
    wait_for_status(page, row, "cancelled")
    row.locator("button.bd-retry").click()
    retry = page.locator("[data-retry-dialog]")
    include = retry.locator("[data-retry-cancelled]")
    assert retry.locator("[data-retry-cancelled-count]").inner_text() == "9"
    assert include.is_visible() and not include.is_checked()
    include.check()
    retry.locator("[data-retry-confirm]").click()
    retry.locator("[data-retry-result][data-kind=ok]").wait_for()
    again = BatchJob.objects.get(retry_of=original)
    assert list(again.items.order_by("index").values_list("source_index", flat=True)) == list(range(10))
    assert "10 items" in retry.locator("[data-retry-result]").inner_text()
