"""Review of automatic retries (issue 13, item 2): races and liveness found in review. Each test
reproduces one finding deterministically (direct service calls, events); those marked xfail
document a defect not fixed yet."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from batch import services
from batch.handlers import ItemContext, Retry, batch_handler
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.processes import _error_reply, _exception
from batch.services import Outcome, Start, Step
from batch.worker import Worker, WorkerConfig
from tests.cluster_handlers import FixedRetry  # also registers cluster.flaky

TIMEOUT = 30


def step(batch: BatchJob, the_step: Step, worker_id: str = "w") -> services.StepResult:
    return services.run_step(batch_id=batch.pk, worker_id=worker_id, lease_seconds=30, step=the_step)


@pytest.mark.django_db
def test_a_retried_step_does_not_count_a_retry_twice_when_its_fetch_took_the_item_back(
    submit: Callable[..., BatchJob],
) -> None:
    """A step writes an at-once retry (started and failed within the step) with no backoff
    (`Retry(backoff=0)`, or a jitter near 0) and fetches: its own fetch takes the item again, held
    by this worker (pending, leased). The reply is lost; the store retries the same step. The
    item now matches the at-once outcome's guard again (`status = 'pending' AND lease_owner = w`),
    so the second write counts the attempt again and appends the error twice: one attempt ran."""
    batch = submit("cluster.flaky", [{}], max_parallel=1, max_attempts=3)
    (held,) = step(batch, Step(fetch=1)).fetched
    same = Step(
        started=[Start(held.id)],
        # The runner stamps every outcome with the attempt it ran (`Outcome.attempt`).
        outcomes=[Outcome(held.id, ItemStatus.PENDING, error="ConnectionError: reset", retry_in=0.0, attempt=1)],
        fetch=1,
    )
    first = step(batch, same)  # committed; its reply is lost
    assert [item.id for item in first.fetched] == [held.id], "precondition: the fetch took the retry back"
    step(batch, same)  # the store's retry of the same step
    row = BatchJobItem.objects.get(pk=held.id)
    assert (row.attempts, len(row.errors)) == (1, 1), f"one attempt ran: attempts={row.attempts}, errors={row.errors}"


# --- liveness: a due retry while the rest of the batch still runs here -----------------------


class Gate:
    blocker_release: asyncio.Event | None = None
    flaky_attempts: list[int] = []
    retried: asyncio.Event | None = None

    @classmethod
    def reset(cls) -> None:
        cls.blocker_release, cls.retried, cls.flaky_attempts = asyncio.Event(), asyncio.Event(), []


@batch_handler("review.block_or_flaky", retry=FixedRetry(attempts=3, max_delay=0.3, on=(ConnectionError,)))
async def block_or_flaky(params: dict[str, Any], ctx: ItemContext) -> None:
    """`block`: wait for the test's gate. Otherwise fail the first attempt (retried after exactly
    0.3 s), then succeed and tell the test."""
    assert Gate.blocker_release is not None and Gate.retried is not None
    if params.get("block"):
        await Gate.blocker_release.wait()
        return
    Gate.flaky_attempts.append(ctx.attempt)
    if ctx.attempt == 1:
        raise ConnectionError("reset")
    Gate.retried.set()


@pytest.mark.django_db(transaction=True)
async def test_a_due_retry_starts_while_another_item_of_the_batch_still_runs_on_the_only_worker() -> None:
    """README (Automatic retries): 'the dispatch loop takes a batch up again only once one of its
    pending items may start — so the wait costs a poll interval at most'. With one worker, item 0
    runs long, item 1 fails and is due again 0.3 s later, a slot is free (max_parallel=2). The
    runner's refill found nothing startable while item 1 waited, set `exhausted` and left its
    loop (its TaskGroup still waits for item 0); the worker excludes a batch it runs from
    `runnable_batches`; so item 1 waits until item 0 ends, however long that is."""
    Gate.reset()
    assert Gate.retried is not None and Gate.blocker_release is not None
    batch = await sync_to_async(
        lambda: (
            services.submit_batch(handler="review.block_or_flaky", items=[{"block": True}, {}], max_parallel=2).batch
        )
    )()
    config = WorkerConfig.from_settings(
        worker_id=f"review-{uuid.uuid4().hex[:8]}",
        handle_signals=False,
        exit_when_idle=False,
        only_batch=batch.pk,
        poll_interval=0.05,
        heartbeat_seconds=0.2,
        concurrency=2,
    )
    worker = Worker(config)
    running = asyncio.create_task(worker.run())
    try:
        # Ten times the backoff plus many poll intervals; a slot is free all along.
        await asyncio.wait_for(Gate.retried.wait(), 3)
        retried_while_blocked = True
    except TimeoutError:
        retried_while_blocked = False
    finally:
        Gate.blocker_release.set()
        done = await asyncio.wait_for(_wait_finished(batch), TIMEOUT)
        worker.stop()
        await asyncio.wait_for(running, TIMEOUT)
    assert done.status == BatchStatus.SUCCEEDED, "the batch does finish once item 0 ends"
    assert retried_while_blocked, f"item 1's retry waited for item 0 (attempts seen: {Gate.flaky_attempts})"


async def _wait_finished(batch: BatchJob) -> BatchJob:
    while True:
        row = await BatchJob.objects.aget(pk=batch.pk)
        if row.is_terminal:
            return row
        await asyncio.sleep(0.02)


@pytest.mark.django_db(transaction=True)
async def test_exit_when_idle_does_not_exit_while_a_retry_waits_its_backoff() -> None:
    """`--exit-when-idle`: 'exit once no batch has work left'. Item 0 of `cluster.flaky` fails its
    first attempt and waits 1 s (FixedRetry). The run ends (nothing startable), and
    `_dispatch_once` sees no runner and no runnable batch (`runnable_batches` leaves out batches
    whose pending items all wait), so the worker exits at once: the batch stays `running` with a
    pending item and no worker."""
    batch = await sync_to_async(lambda: services.submit_batch(handler="cluster.flaky", items=[{}]).batch)()
    config = WorkerConfig.from_settings(
        worker_id=f"review-{uuid.uuid4().hex[:8]}",
        handle_signals=False,
        exit_when_idle=True,
        poll_interval=0.05,
        heartbeat_seconds=0.2,
    )
    await asyncio.wait_for(Worker(config).run(), TIMEOUT)
    row = await BatchJob.objects.aget(pk=batch.pk)
    item = await BatchJobItem.objects.aget(batch=batch)
    assert (row.status, item.status, item.attempts) == (BatchStatus.SUCCEEDED, ItemStatus.SUCCEEDED, 2), (
        f"the worker exited with the batch {row.status} and its item {item.status} after {item.attempts} attempt(s)"
    )


# --- the sync (process) path: the exception's type must survive the trip back ------------------


class KeywordOnlyError(ConnectionError):
    """Pickles, but cannot be rebuilt by `pickle.loads` (its __init__ takes a keyword only):
    common in client libraries' exception classes."""

    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


def test_a_process_handlers_exception_that_cannot_be_rebuilt_still_matches_its_retry_policy() -> None:
    """The child sends the pickled exception; when it cannot be rebuilt (`_error_reply` tries),
    the parent raises `HandlerError(type_name, message)`, which is no `ConnectionError`: a handler
    with `Retry(on=(ConnectionError,))` retries this error as `async def` or `isolation="thread"`,
    but fails it at once in a process. (The direct calls below are what `_run_job` and
    `SyncProcessPool.call` do with it.)"""
    try:
        raise KeywordOnlyError(code=503)
    except KeywordOnlyError as exc:
        reply = _error_reply(exc)
    raised = _exception(reply)
    assert Retry(on=(ConnectionError,)).applies_to(raised), f"came back as {type(raised).__name__}: {raised}"
