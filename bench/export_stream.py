"""`python -m bench.export_stream [--items N] [--runs 3]`: time to first byte, total time and the
server's extra RSS of `GET /api/batches/{id}/export/` (JSONL and CSV) of one N-item batch, through
a real ASGI server (`manage.py serve --no-worker`, daphne), medians of the runs.

The database is DATABASE_URL; its name must contain "bench" (the script writes a batch there). A
missing PostgreSQL database is created; either database is migrated first.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "batchsite.settings")
    os.environ.setdefault("DJANGO_DEBUG", "1")
    import django

    django.setup()


def _ensure_database(url: str) -> None:
    if not url.startswith("postgres"):
        return
    import psycopg

    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def _make_batch(items: int) -> tuple[str, str]:
    """(batch id, token): a finished batch of `items` forecast-like items, arranged in bulk."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from batch import services
    from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus

    call_command("migrate", verbosity=0)
    user, _ = get_user_model().objects.get_or_create(username="export-bench")
    token, _ = Token.objects.get_or_create(user=user)
    BatchJob.objects.filter(created_by=user).delete()
    params = [{"store": f"S{i % 500}", "product": f"P{i // 500}", "horizon": 28} for i in range(items)]
    batch = services.submit_batch(handler="demo.noop", items=params, created_by=user).batch
    result = {"mape_naive": 0.123456, "mape_ma": 0.234567, "best": "seasonal_naive", "forecast": [1.5] * 28}
    BatchJobItem.objects.filter(batch_id=batch.pk).update(status=ItemStatus.SUCCEEDED, attempts=1, result=result)
    BatchJob.objects.filter(pk=batch.pk).update(status=BatchStatus.SUCCEEDED, succeeded_items=items)
    return str(batch.pk), token.key


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssPeak(threading.Thread):
    """The highest VmRSS of `pid` while running (sampled every 5 ms)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, _rss_kib(pid), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.005):
            self.peak = max(self.peak, _rss_kib(self.pid))


def _download(port: int, path: str, token: str, pid: int) -> dict[str, float]:
    baseline = _rss_kib(pid)
    sampler = RssPeak(pid)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    began = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Token {token}", "Host": "127.0.0.1"})
    response = conn.getresponse()
    assert response.status == 200, (response.status, response.read()[:500])
    first = response.read(1)
    first_byte = time.perf_counter() - began
    size = len(first)
    while chunk := response.read(1 << 16):
        size += len(chunk)
    total = time.perf_counter() - began
    conn.close()
    sampler.stopped.set()
    sampler.join()
    return {
        "ttfb_s": first_byte,
        "total_s": total,
        "mib": size / 2**20,
        "extra_rss_mib": (sampler.peak - baseline) / 1024,
    }


def _serve(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DJANGO_DEBUG": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "manage.py"), "serve", "--no-worker", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not listen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if "bench" not in url.rsplit("/", 1)[-1]:
        parser.error('DATABASE_URL must name a database whose name contains "bench"')
    _ensure_database(url)
    _setup_django()
    batch_id, token = _make_batch(args.items)
    server = _serve(args.port)
    try:
        _download(args.port, f"/api/batches/{batch_id}/", token, server.pid)  # warm: imports, first connection
        results: dict[str, Any] = {}
        for fmt in ("jsonl", "csv"):
            runs = [
                _download(args.port, f"/api/batches/{batch_id}/export/?as={fmt}", token, server.pid)
                for _ in range(args.runs)
            ]
            results[fmt] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results[fmt]["max_extra_rss_mib"] = max(run["extra_rss_mib"] for run in runs)
    finally:
        server.terminate()
        server.wait(timeout=30)
    vendor = "postgresql" if url.startswith("postgres") else "sqlite"
    for fmt, numbers in results.items():
        shown = ", ".join(f"{key} {value:.3f}" for key, value in numbers.items())
        sys.stdout.write(f"{vendor} {args.items} items {fmt}: {shown}\n")


if __name__ == "__main__":
    main()
