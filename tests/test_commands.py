"""Management commands, including `runbatch` as a real process."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from tests.conftest import worker_log

StartWorker = Callable[..., subprocess.Popen[str]]


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def running_items(batch: BatchJob) -> int:
    batch.refresh_from_db()
    return batch.running_items


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_runbatch_process_completes_200_sleep_items_at_parallel_4(start_worker: StartWorker) -> None:
    batch = services.submit_batch(handler="demo.sleep", items=[{"seconds": 0.05}] * 200, max_parallel=4).batch
    worker = start_worker("--batch", str(batch.id))
    assert worker.wait(timeout=60) == 0, worker_log(worker)
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items) == (BatchStatus.SUCCEEDED, 200)
    assert batch.started_at is not None and batch.finished_at is not None
    wall = (batch.finished_at - batch.started_at).total_seconds()
    print(f"200 x 50 ms at parallel 4: {wall:.3f} s (ideal 2.5 s, ratio {wall / 2.5:.3f})")
    assert wall >= 2.5 - 0.05, "more than 4 items ran at once"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_lets_running_items_finish_and_leaves_none_running(start_worker: StartWorker) -> None:
    batch = services.submit_batch(handler="demo.sleep", items=[{"seconds": 0.5}] * 40, max_parallel=4).batch
    worker = start_worker()
    wait_for(lambda: running_items(batch) == 4, what="4 running items")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker_log(worker)
    batch.refresh_from_db()
    assert batch.running_items == 0
    assert not BatchJobItem.objects.filter(batch=batch, status=ItemStatus.RUNNING).exists()
    assert batch.succeeded_items >= 4, "the items running at SIGTERM were allowed to finish"
    assert batch.pending_items == 40 - batch.succeeded_items


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_past_the_drain_gives_stuck_items_back(start_worker: StartWorker) -> None:
    items = [{"seconds": 600, "cooperative": False}] * 6
    batch = services.submit_batch(handler="demo.sleep", items=items, max_parallel=3).batch
    worker = start_worker("--drain-timeout", "0.5")
    wait_for(lambda: running_items(batch) == 3, what="3 running items")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker_log(worker)
    batch.refresh_from_db()
    assert (batch.status, batch.running_items, batch.pending_items) == (BatchStatus.RUNNING, 0, 6)
    assert set(BatchJobItem.objects.filter(batch=batch).values_list("attempts", flat=True)) == {0}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_runbatch_refuses_a_worker_id_in_use(start_worker: StartWorker) -> None:
    services.register_worker(worker_id="taken", hostname="elsewhere", pid=1, concurrency=1, lease_seconds=30)
    worker = start_worker("--worker-id", "taken")
    assert worker.wait(timeout=30) != 0
    assert "in use" in worker_log(worker)


@pytest.mark.django_db
def test_submitbatch_generates_store_product_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("submitbatch", "demo.forecast", "--stores", "3", "--products", "4", "--param", "horizon=7")
    batch = BatchJob.objects.get()
    assert (batch.total_items, batch.handler) == (12, "demo.forecast")
    last = BatchJobItem.objects.get(batch=batch, index=11)
    assert last.params == {"store": "S003", "product": "P0004", "horizon": 7}
    assert str(batch.id) in capsys.readouterr().out


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("items.json", json.dumps([{"seconds": 1}, {"seconds": 2}])),
        ("items.jsonl", '{"seconds": 1}\n\n{"seconds": 2}\n'),
        ("items.csv", "seconds,fail\n1,false\n2,true\n"),
    ],
)
def test_submitbatch_reads_json_jsonl_and_csv(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    call_command("submitbatch", "demo.sleep", "--file", str(path), "--max-parallel", "2", verbosity=0)
    batch = BatchJob.objects.get()
    assert (batch.total_items, batch.max_parallel) == (2, 2)
    assert BatchJobItem.objects.get(batch=batch, index=1).params["seconds"] == 2.0


@pytest.mark.django_db
def test_submitbatch_reports_invalid_items_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps([{"seconds": 1}, {"seconds": "soon"}]))
    with pytest.raises(CommandError, match='"1"'):
        call_command("submitbatch", "demo.sleep", "--file", str(path))
    assert not BatchJob.objects.exists()


@pytest.mark.django_db
def test_cancelbatch_cancels_and_rejects_finished_or_unknown(submit: Any, capsys: pytest.CaptureFixture[str]) -> None:
    batch = submit("demo.noop", [{}] * 3)
    call_command("cancelbatch", str(batch.id))
    assert "cancelled" in capsys.readouterr().out
    with pytest.raises(CommandError, match="already finished"):
        call_command("cancelbatch", str(batch.id))
    with pytest.raises(CommandError, match="No batch"):
        call_command("cancelbatch", "00000000-0000-0000-0000-000000000000")


def _finished_with_failures(submit: Callable[..., BatchJob]) -> BatchJob:
    batch = submit("demo.noop", [{"n": i} for i in range(4)], max_parallel=4)
    held = services.claim_items(batch_id=batch.pk, worker_id="w", limit=4, lease_seconds=30)
    outcomes = [
        services.Outcome(c.id, ItemStatus.FAILED if c.index % 2 else ItemStatus.SUCCEEDED, error="boom") for c in held
    ]
    return services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=outcomes)


@pytest.mark.django_db
def test_exportbatch_writes_the_export_to_stdout_or_a_file(
    submit: Callable[..., BatchJob], capsysbinary: Any, tmp_path: Path
) -> None:
    batch = _finished_with_failures(submit)
    call_command("exportbatch", str(batch.pk))
    lines = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert [(row["index"], row["status"], row["params"]) for row in lines] == [
        (0, "succeeded", {"n": 0}),
        (1, "failed", {"n": 1}),
        (2, "succeeded", {"n": 2}),
        (3, "failed", {"n": 3}),
    ]
    out = tmp_path / "b.csv"
    call_command("exportbatch", str(batch.pk), "--as", "csv", "--output", str(out))
    rows = out.read_text().splitlines()
    assert rows[0].startswith("index,status,attempts,params.n") and len(rows) == 5
    with pytest.raises(CommandError, match="No batch"):
        call_command("exportbatch", "00000000-0000-0000-0000-000000000000")


@pytest.mark.django_db
def test_retrybatch_runs_the_failed_items_again_and_refuses_what_it_cannot(
    submit: Callable[..., BatchJob], capsys: Any
) -> None:
    batch = _finished_with_failures(submit)
    call_command("retrybatch", str(batch.pk))
    new_id, status, total, _ = capsys.readouterr().out.split()
    retry = BatchJob.objects.get(pk=new_id)
    assert (status, total, retry.retry_of_id) == ("pending", "2", batch.pk)
    assert sorted(BatchJobItem.objects.filter(batch=retry).values_list("source_index", flat=True)) == [1, 3]
    with pytest.raises(CommandError, match="has not finished"):
        call_command("retrybatch", new_id)
    with pytest.raises(CommandError, match="has no items of those statuses"):
        call_command("retrybatch", str(batch.pk), "--include", "cancelled")
