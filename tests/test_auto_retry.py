"""Automatic retries: a handler's `Retry` policy, the backoff a failed attempt waits out as a
pending item that holds no slot, the `errors` history, and how retries meet stops."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db.models import F

from batch import selectors, services
from batch.handlers import HandlerSpec, ItemCancelled, ItemContext, Retry
from batch.models import BatchJob, BatchJobItem, BatchPermit, BatchStatus, ItemStatus
from batch.processes import HandlerTimeout
from batch.runner import MAX_ERROR_LENGTH, BatchRunner
from batch.services import ClaimedItem, Outcome
from batch.services._base import db_now
from batch.services.submit import default_attempts
from batch.sync_calls import ThreadCalls
from tests.cluster_handlers import FLAKY_RETRY, peak_concurrency
from tests.cluster_support import Cluster, wait_until
from tests.test_runner import MemoryStore

pytestmark = pytest.mark.django_db


def claim(batch: BatchJob, n: int = 1) -> list[ClaimedItem]:
    return services.claim_items(batch_id=batch.pk, worker_id="w", limit=n, lease_seconds=30)


def complete(batch: BatchJob, *outcomes: Outcome) -> BatchJob:
    return services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=list(outcomes))


def retry(item: ClaimedItem, seconds: float, error: str = "ConnectionError: reset") -> Outcome:
    return Outcome(item.id, ItemStatus.PENDING, error=error, retry_in=seconds)


def wait_out_backoffs(batch: BatchJob) -> None:
    """Move every waiting item's `available_at` into the past (instead of sleeping)."""
    BatchJobItem.objects.filter(batch=batch, available_at__isnull=False).update(
        available_at=F("available_at") - timedelta(days=1)
    )


# --- the policy -----------------------------------------------------------------------------


def test_the_backoff_has_full_jitter_under_an_exponential_ceiling() -> None:
    policy = Retry(attempts=10, backoff=2.0, max_delay=60)
    random.seed(7)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (40, 60.0), (10_000, 60.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.9 and min(delays) < ceiling * 0.1, "spread over the whole range"


@pytest.mark.parametrize(
    "kwargs", [{"attempts": 0}, {"backoff": -1}, {"max_delay": -1}, {"on": ()}, {"on": (ValueError, "x")}]
)
def test_a_bad_retry_policy_is_refused_where_it_is_declared(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Retry"):
        Retry(**kwargs)


def test_a_cancellation_is_never_retried_even_if_the_policy_names_exception() -> None:
    policy = Retry(on=(Exception,))
    assert policy.applies_to(ConnectionError()) and policy.applies_to(HandlerTimeout(1.0))
    assert not policy.applies_to(ItemCancelled())
    assert not Retry(on=(ConnectionError,)).applies_to(ValueError())


def test_a_batch_attempts_default_to_its_handlers_policy(submit: Callable[..., BatchJob], settings: Any) -> None:
    settings.BATCH_MAX_ATTEMPTS = 2
    assert default_attempts(services_spec("cluster.flaky")) == FLAKY_RETRY.attempts == 3
    assert submit("cluster.flaky", [{}]).max_attempts == 3
    assert submit("cluster.flaky", [{}], max_attempts=7).max_attempts == 7
    assert submit("demo.noop", [{}]).max_attempts == 2, "no policy: BATCH_MAX_ATTEMPTS (lost leases)"


def services_spec(name: str) -> HandlerSpec:
    from batch.handlers import get_handler

    return get_handler(name)


# --- the runner decides ---------------------------------------------------------------------


def runner_with(policy: Retry | None) -> BatchRunner:
    async def handler(params: dict[str, Any], ctx: ItemContext) -> None:
        raise AssertionError("not called")

    spec = HandlerSpec(name="t", func=handler, params=None, is_async=True, description="", retry=policy)
    return BatchRunner(
        batch_id=uuid.uuid4(),
        handler=spec,
        store=MemoryStore(0),
        parallel=1,
        sync_calls=ThreadCalls(1),
    )


def item(attempt: int, max_attempts: int = 3) -> ClaimedItem:
    return ClaimedItem(id=1, index=0, params={}, attempt=attempt, max_attempts=max_attempts)


@pytest.mark.parametrize(
    ("policy", "attempt", "error", "retried"),
    [
        (None, 1, ConnectionError(), False),  # no policy: a failure is final
        (Retry(on=(ConnectionError,)), 1, ConnectionError(), True),
        (Retry(on=(ConnectionError,)), 2, ConnectionError(), True),
        (Retry(on=(ConnectionError,)), 3, ConnectionError(), False),  # the batch's last attempt
        (Retry(on=(ConnectionError,)), 1, ValueError(), False),  # not an error it covers
        (Retry(on=(TimeoutError,)), 1, HandlerTimeout(0.5), True),  # the item timeout is a TimeoutError
    ],
)
def test_a_failed_attempt_is_retried_only_as_the_policy_and_the_batch_allow(
    policy: Retry | None, attempt: int, error: Exception, retried: bool
) -> None:
    outcome = runner_with(policy)._failure(item(attempt), error, "boom")
    if retried:
        assert outcome.status == ItemStatus.PENDING and outcome.retry_in is not None
        assert 0 <= outcome.retry_in <= 2.0 * 2 ** (attempt - 1)
    else:
        assert (outcome.status, outcome.retry_in) == (ItemStatus.FAILED, None)


def test_a_huge_error_message_is_truncated_before_it_is_kept() -> None:
    outcome = runner_with(None)._failure(item(1), RuntimeError(), "x" * 1_000_000)
    assert len(outcome.error) < MAX_ERROR_LENGTH + 20 and outcome.error.endswith("(truncated)")


# --- the database: waiting, history, stops ---------------------------------------------------


def test_a_retried_attempt_waits_as_pending_and_holds_nothing_until_its_backoff_passes(
    submit: Callable[..., BatchJob],
) -> None:
    batch = submit("cluster.flaky", [{}, {}], max_parallel=2)
    first, second = claim(batch, 2)
    before = db_now()
    after = complete(batch, retry(first, 30))
    assert (after.status, after.running_items, after.failed_items) == (BatchStatus.RUNNING, 1, 0)
    row = BatchJobItem.objects.get(pk=first.id)
    assert (row.status, row.attempts, row.lease_owner, row.started_at, row.finished_at) == (
        "pending",
        1,
        "",
        None,
        None,
    )
    assert row.available_at is not None
    assert timedelta(seconds=29) < row.available_at - before < timedelta(seconds=31), "by the database's clock"
    assert row.errors == [{"attempt": 1, "error": "ConnectionError: reset", "at": row.errors[0]["at"]}]
    assert claim(batch, 2) == [], "not before its backoff"

    complete(batch, Outcome(second.id, ItemStatus.SUCCEEDED))
    assert BatchJob.objects.get(pk=batch.pk).status == BatchStatus.RUNNING, "not finished while an item waits"
    assert selectors.runnable_batches() == [], "only a waiting item: no worker takes the batch up"

    wait_out_backoffs(batch)
    assert [row[0] for row in selectors.runnable_batches()] == [batch.pk]
    (again,) = claim(batch)
    assert (again.id, again.attempt, again.max_attempts) == (first.id, 2, 3)
    done = complete(batch, Outcome(again.id, ItemStatus.SUCCEEDED, result={"ok": 1}))
    assert (done.status, done.succeeded_items, done.failed_items) == (BatchStatus.SUCCEEDED, 2, 0)


def test_a_retry_of_an_item_started_and_failed_within_one_step_counts_no_running(
    submit: Callable[..., BatchJob],
) -> None:
    batch = submit("cluster.flaky", [{}], max_parallel=1)
    (held,) = services.run_step(batch_id=batch.pk, worker_id="w", lease_seconds=30, step=services.Step(fetch=1)).fetched
    step = services.Step(started=[services.Start(held.id)], outcomes=[retry(held, 30)])
    assert services.run_step(batch_id=batch.pk, worker_id="w", lease_seconds=30, step=step).status == "running"
    batch.refresh_from_db()
    assert (batch.running_items, batch.pending_items, batch.started_at is not None) == (0, 1, True)
    row = BatchJobItem.objects.get(pk=held.id)
    assert (row.status, row.attempts, row.errors[0]["attempt"]) == ("pending", 1, 1)


def test_errors_keep_the_last_five_failed_attempts_oldest_first(submit: Callable[..., BatchJob]) -> None:
    batch = submit("cluster.flaky", [{}], max_attempts=7)
    for attempt in range(1, 7):
        (held,) = claim(batch)
        assert held.attempt == attempt
        complete(batch, retry(held, 5, error=f"ConnectionError: attempt {attempt}"))
        wait_out_backoffs(batch)
    (last,) = claim(batch)
    done = complete(batch, Outcome(last.id, ItemStatus.FAILED, error="ConnectionError: attempt 7"))
    assert (done.status, done.failed_items) == (BatchStatus.FAILED, 1)
    row = BatchJobItem.objects.get(pk=last.id)
    assert [(e["attempt"], e["error"]) for e in row.errors] == [
        (n, f"ConnectionError: attempt {n}") for n in range(3, 8)
    ]
    assert (row.attempts, row.error) == (7, "ConnectionError: attempt 7")


def test_a_success_leaves_the_errors_of_earlier_attempts(submit: Callable[..., BatchJob]) -> None:
    batch = submit("cluster.flaky", [{}])
    (held,) = claim(batch)
    complete(batch, retry(held, 1))
    wait_out_backoffs(batch)
    (again,) = claim(batch)
    complete(batch, Outcome(again.id, ItemStatus.SUCCEEDED, result={"attempt": 2}))
    row = BatchJobItem.objects.get(pk=held.id)
    assert (row.status, row.result, [e["attempt"] for e in row.errors]) == ("succeeded", {"attempt": 2}, [1])


def test_a_retry_in_a_batch_being_cancelled_is_cancelled_not_left_waiting(submit: Callable[..., BatchJob]) -> None:
    batch = submit("cluster.flaky", [{}, {}, {}], max_parallel=2)
    first, second = claim(batch, 2)
    cancel = services.request_cancel(batch_id=batch.pk)
    assert cancel.batch is not None and cancel.batch.status == BatchStatus.CANCELLING
    after = complete(batch, retry(first, 30))
    assert (after.status, after.running_items, after.cancelled_items) == (BatchStatus.CANCELLING, 1, 2)
    assert BatchJobItem.objects.get(pk=first.id).status == ItemStatus.CANCELLED
    done = complete(batch, retry(second, 30))
    assert (done.status, done.cancelled_items, done.pending_items) == (BatchStatus.CANCELLED, 3, 0)


def test_a_waiting_retry_is_cancelled_with_the_batch(submit: Callable[..., BatchJob]) -> None:
    batch = submit("cluster.flaky", [{}])
    (held,) = claim(batch)
    complete(batch, retry(held, 30))
    cancel = services.request_cancel(batch_id=batch.pk)
    assert cancel.batch is not None and cancel.batch.status == BatchStatus.CANCELLED
    assert BatchJobItem.objects.get(pk=held.id).status == ItemStatus.CANCELLED


def test_retries_are_not_failures_for_the_failure_threshold(submit: Callable[..., BatchJob]) -> None:
    batch = submit("cluster.flaky", [{}, {}], max_parallel=2, max_failures=1)
    first, second = claim(batch, 2)
    after = complete(batch, retry(first, 30), retry(second, 30))
    assert (after.status, after.failed_items, after.status_reason) == (BatchStatus.RUNNING, 0, None)


def test_a_paused_batch_keeps_its_waiting_retries_and_resumes_them(submit: Callable[..., BatchJob]) -> None:
    batch = submit("cluster.flaky", [{}])
    (held,) = claim(batch)
    complete(batch, retry(held, 30))
    services.pause_batch(batch_id=batch.pk)
    wait_out_backoffs(batch)
    assert claim(batch) == [], "paused: nothing starts"
    services.resume_batch(batch_id=batch.pk)
    assert [c.id for c in claim(batch)] == [held.id]


def test_retry_failed_items_starts_them_with_a_clean_history(
    submit: Callable[..., BatchJob], api_client: Any, user: Any
) -> None:
    batch = submit("cluster.flaky", [{}], max_attempts=1, created_by=user)
    (held,) = claim(batch)
    complete(batch, Outcome(held.id, ItemStatus.FAILED, error="ConnectionError: x"))
    result = services.retry_batch(batch_id=batch.pk, by=user)
    assert result.batch is not None
    copy = BatchJobItem.objects.get(batch=result.batch)
    assert (copy.errors, copy.attempts, copy.available_at, copy.source_index) == ([], 0, None, 0)
    body = api_client.get(f"/api/batches/{batch.pk}/items/").json()
    item_body = body["results"][0] if "results" in body else body[0]
    assert [e["error"] for e in item_body["errors"]] == ["ConnectionError: x"]


# --- end to end: a real worker ----------------------------------------------------------------


@pytest.fixture
def cluster(start_worker: Callable[..., Any], tmp_path: Path) -> Iterator[Cluster]:
    group = Cluster(start_worker=start_worker, events_file=tmp_path / "events.log")
    yield group
    group.stop_all()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("handler", ["cluster.flaky", "cluster.flaky_sync"])
def test_a_real_worker_retries_after_the_backoff_and_the_batch_succeeds(
    cluster: Cluster, handler: str, record_property: Callable[[str, object], None]
) -> None:
    batch = services.submit_batch(
        handler=handler,
        items=[{"fail_attempts": 2}, {"fail_attempts": 0}, {"fail_attempts": 1}, {"error": "value"}],
        max_parallel=2,
    ).batch
    cluster.start("w1", CLUSTER_RETRY_DELAY="0.5")
    done = cluster.wait_batch(batch, ("succeeded", "failed"), timeout=60)
    items = {row.index: row for row in BatchJobItem.objects.filter(batch=batch)}
    assert (done.status, done.succeeded_items, done.failed_items) == ("failed", 3, 1), cluster.logs()
    assert [items[i].attempts for i in range(4)] == [3, 1, 2, 1]
    assert [len(items[i].errors) for i in range(4)] == [2, 0, 1, 1]
    assert items[3].error.startswith("ValueError"), "an error the policy does not cover fails at once"
    assert items[0].result == {"attempt": 3}
    ends = {(e.index, e.attempt): e.at for e in cluster.events() if e.kind == "end"}
    starts = {(e.index, e.attempt): e.at for e in cluster.events() if e.kind == "start"}
    for index, attempt in [(0, 2), (0, 3), (2, 2)]:
        waited = starts[index, attempt] - ends[index, attempt - 1]
        record_property(f"item{index}_attempt{attempt}_waited_s", round(waited, 3))
        assert waited >= 0.5 - 0.05, f"item {index} attempt {attempt} started {waited:.3f} s after the failure"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_waiting_retry_holds_no_slot_other_items_run_at_the_cap_meanwhile(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    items = [{"fail_attempts": 1, "seconds": 0.05}] + [{"fail_attempts": 0, "seconds": 0.2}] * 14
    batch = services.submit_batch(handler="cluster.flaky", items=items, max_parallel=2).batch
    cluster.start("w1", CLUSTER_RETRY_DELAY="1.2")
    cluster.wait_batch(batch, ("succeeded",), timeout=60)
    events = [e for e in cluster.events() if e.batch_id == str(batch.pk)]
    failed_at = next(e.at for e in events if e.kind == "end" and e.index == 0 and e.attempt == 1)
    retried_at = next(e.at for e in events if e.kind == "start" and e.index == 0 and e.attempt == 2)
    assert retried_at - failed_at >= 1.15
    during = [e for e in events if failed_at < e.at < retried_at]
    assert peak_concurrency(events, str(batch.pk)) == 2, "never above the cap"
    running, peak = (
        sum(1 for e in events if e.kind == "start" and e.at <= failed_at)
        - sum(1 for e in events if e.kind == "end" and e.at <= failed_at),
        0,
    )
    for event in during:
        running += 1 if event.kind == "start" else -1
        peak = max(peak, running)
    record_property("waited_s", round(retried_at - failed_at, 3))
    record_property("peak_running_while_it_waited", peak)
    assert peak == 2, "while item 0 waited, two other items ran: it held no slot"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_batch_with_only_waiting_retries_holds_no_permits(cluster: Cluster) -> None:
    batch = services.submit_batch(handler="cluster.flaky", items=[{"fail_attempts": 1}], max_parallel=2).batch
    cluster.start("w1", CLUSTER_RETRY_DELAY="4")
    waiting = wait_until(
        lambda: BatchJobItem.objects.filter(batch=batch, status="pending", attempts=1).exists(),
        timeout=30,
        what="the first attempt to fail",
    )
    assert waiting
    wait_until(
        lambda: not BatchPermit.objects.filter(batch=batch, permits__gt=0).exists(),
        timeout=3,
        what="the permits to be given back while the item waits",
    )
    row = BatchJobItem.objects.get(batch=batch)
    assert (row.status, row.lease_owner) == ("pending", ""), "still waiting: nothing held"
    assert BatchJob.objects.get(pk=batch.pk).running_items == 0
    done = cluster.wait_batch(batch, ("succeeded",), timeout=30)
    assert done.succeeded_items == 1
