"""State transitions in batch.services against the real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchPermit, BatchStatus, BatchWorker, ItemStatus
from batch.services import CancelOutcome, Outcome, SubmitError

pytestmark = pytest.mark.django_db

Submit = Callable[..., BatchJob]


def claim(batch: BatchJob, limit: int = 100, worker: str = "w1", lease: float = 30) -> list[services.ClaimedItem]:
    return services.claim_items(batch_id=batch.id, worker_id=worker, limit=limit, lease_seconds=lease)


def finish(batch: BatchJob, items: list[services.ClaimedItem], status: ItemStatus, worker: str = "w1") -> BatchJob:
    outcomes = [Outcome(item.id, status, result={"i": item.index} if status == "succeeded" else None) for item in items]
    return services.complete_items(batch_id=batch.id, worker_id=worker, outcomes=outcomes)


# --- submit ---------------------------------------------------------------------------------


def test_submit_writes_the_batch_and_every_item_in_order(submit: Submit) -> None:
    batch = submit("demo.sleep", [{"seconds": i % 60} for i in range(4_500)], max_parallel=8, name="n")
    assert (batch.status, batch.total_items, batch.max_parallel, batch.effective_parallel) == ("pending", 4_500, 8, 4)
    assert BatchJobItem.objects.filter(batch=batch).count() == 4_500
    last = BatchJobItem.objects.get(batch=batch, index=4_499)
    assert last.params == {"seconds": 59.0, "fail": False, "cooperative": True}


def test_submit_of_unknown_handler_is_refused_and_writes_nothing() -> None:
    with pytest.raises(SubmitError) as caught:
        services.submit_batch(handler="nope", items=[{}])
    assert "Unknown handler 'nope'" in str(caught.value.errors["handler"][0])
    assert not BatchJob.objects.exists()


def test_submit_with_invalid_item_names_the_item_index() -> None:
    items: list[Any] = [{"seconds": 1}, {"seconds": 1}, {"seconds": -5}, "not an object"]
    with pytest.raises(SubmitError) as caught:
        services.submit_batch(handler="demo.sleep", items=items)
    errors = caught.value.errors["items"]
    assert set(errors) == {"2", "3"}
    assert "seconds" in errors["2"]
    assert not BatchJob.objects.exists() and not BatchJobItem.objects.exists()


def test_submit_of_empty_list_is_refused() -> None:
    with pytest.raises(SubmitError) as caught:
        services.submit_batch(handler="demo.noop", items=[])
    assert "at least one item" in str(caught.value.errors["items"][0])


def test_submit_of_too_many_items_is_refused(settings: Any) -> None:
    settings.BATCH_MAX_ITEMS_PER_BATCH = 10
    with pytest.raises(SubmitError) as caught:
        services.submit_batch(handler="demo.noop", items=[{}] * 11)
    assert caught.value.too_many_items
    assert not BatchJob.objects.exists()


@pytest.mark.parametrize("max_parallel", [0, -1, 10_001])
def test_submit_with_out_of_range_max_parallel_is_refused(max_parallel: int) -> None:
    with pytest.raises(SubmitError) as caught:
        services.submit_batch(handler="demo.noop", items=[{}], max_parallel=max_parallel)
    assert "max_parallel" in caught.value.errors


def test_submit_with_same_idempotency_key_returns_the_first_batch(django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("alice")
    first = services.submit_batch(handler="demo.noop", items=[{}], created_by=user, idempotency_key="k1")
    again = services.submit_batch(handler="demo.noop", items=[{}, {}], created_by=user, idempotency_key="k1")
    assert first.created and not again.created
    assert again.batch.pk == first.batch.pk
    assert BatchJob.objects.count() == 1


# --- claim, complete, finalize --------------------------------------------------------------


def test_claim_never_exceeds_effective_parallel_across_workers(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 20, max_parallel=3)
    first = claim(batch, limit=2, worker="a")
    second = claim(batch, limit=10, worker="b")
    third = claim(batch, limit=10, worker="c")
    assert (len(first), len(second), len(third)) == (2, 1, 0)
    batch.refresh_from_db()
    assert (batch.status, batch.running_items) == (BatchStatus.RUNNING, 3)
    assert batch.started_at is not None


def test_claim_takes_items_in_index_order_and_counts_attempts(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 5)
    items = claim(batch, limit=2)
    assert [i.index for i in items] == [0, 1]
    assert all(i.attempt == 1 for i in items)
    row = BatchJobItem.objects.get(pk=items[0].id)
    assert (row.status, row.lease_owner, row.attempts) == (ItemStatus.RUNNING, "w1", 1)


def test_batch_succeeds_when_every_item_succeeded(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 3)
    batch = finish(batch, claim(batch), ItemStatus.SUCCEEDED)
    assert (batch.status, batch.succeeded_items, batch.running_items) == ("succeeded", 3, 0)
    assert batch.finished_at is not None
    assert BatchJobItem.objects.get(batch=batch, index=2).result == {"i": 2}


def test_batch_fails_when_an_item_failed_and_records_the_error(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 3)
    items = claim(batch)
    finish(batch, items[:2], ItemStatus.SUCCEEDED)
    services.complete_items(
        batch_id=batch.id, worker_id="w1", outcomes=[Outcome(items[2].id, ItemStatus.FAILED, error="ValueError: x")]
    )
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items, batch.failed_items) == ("failed", 2, 1)
    assert BatchJobItem.objects.get(pk=items[2].id).error == "ValueError: x"


def test_result_of_an_item_the_worker_no_longer_owns_is_discarded(submit: Submit) -> None:
    batch = submit("demo.noop", [{}])
    items = claim(batch, worker="a")
    batch = finish(batch, items, ItemStatus.SUCCEEDED, worker="b")
    assert (batch.status, batch.running_items, batch.succeeded_items) == ("running", 1, 0)


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_cancels_pending_items_at_once_and_waits_for_running(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 10, max_parallel=2)
    running = claim(batch)
    result = services.request_cancel(batch_id=batch.id)
    assert result.outcome is CancelOutcome.REQUESTED
    assert result.batch is not None
    assert (result.batch.status, result.batch.cancelled_items, result.batch.running_items) == ("cancelling", 8, 2)
    assert claim(batch) == []
    batch = finish(batch, running, ItemStatus.CANCELLED)
    assert (batch.status, batch.cancelled_items) == ("cancelled", 10)


def test_cancel_of_batch_with_nothing_running_ends_it_at_once(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4)
    result = services.request_cancel(batch_id=batch.id)
    assert result.batch is not None and result.batch.status == BatchStatus.CANCELLED


def test_cancel_of_cancelling_batch_reports_it_and_changes_nothing(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4)
    claim(batch, limit=1)
    services.request_cancel(batch_id=batch.id)
    again = services.request_cancel(batch_id=batch.id)
    assert again.outcome is CancelOutcome.ALREADY_CANCELLING


def test_cancel_of_finished_batch_is_rejected(submit: Submit) -> None:
    batch = submit("demo.noop", [{}])
    finish(batch, claim(batch), ItemStatus.SUCCEEDED)
    result = services.request_cancel(batch_id=batch.id)
    assert result.outcome is CancelOutcome.TERMINAL
    assert result.batch is not None and result.batch.status == BatchStatus.SUCCEEDED


def test_cancel_of_unknown_batch_is_not_found() -> None:
    import uuid

    assert services.request_cancel(batch_id=uuid.uuid4()).outcome is CancelOutcome.NOT_FOUND


# --- resize ---------------------------------------------------------------------------------


def test_resize_changes_max_parallel_of_an_active_batch(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 3, max_parallel=1)
    resized = services.resize_batch(batch_id=batch.id, max_parallel=3)
    assert resized is not None and resized.max_parallel == 3
    assert len(claim(batch)) == 3


def test_resize_of_finished_batch_is_refused(submit: Submit) -> None:
    batch = submit("demo.noop", [{}])
    finish(batch, claim(batch), ItemStatus.SUCCEEDED)
    assert services.resize_batch(batch_id=batch.id, max_parallel=2) is None


def test_resize_to_zero_is_invalid(submit: Submit) -> None:
    batch = submit("demo.noop", [{}])
    with pytest.raises(services.InvalidValue):
        services.resize_batch(batch_id=batch.id, max_parallel=0)


# --- leases ---------------------------------------------------------------------------------


def expire(items: list[services.ClaimedItem]) -> None:
    """The items' worker stopped renewing: their leases and its permits lapse."""
    past = timezone.now() - timedelta(seconds=1)
    BatchJobItem.objects.filter(pk__in=[i.id for i in items]).update(lease_expires_at=past)
    BatchPermit.objects.update(expires_at=past)


def test_expired_lease_puts_the_item_back_while_attempts_remain(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 2)
    expire(claim(batch, worker="dead"))
    assert services.recover_expired_leases() == 2
    batch.refresh_from_db()
    assert (batch.running_items, batch.pending_items) == (0, 2)
    again = claim(batch, worker="alive")
    assert [i.attempt for i in again] == [2, 2]


def test_expired_lease_on_the_last_attempt_fails_the_item(submit: Submit) -> None:
    batch = submit("demo.noop", [{}])
    for _ in range(batch.max_attempts):
        expire(claim(batch, worker="dead"))
        services.recover_expired_leases()
    batch.refresh_from_db()
    assert (batch.status, batch.failed_items) == ("failed", 1)
    assert "lease expired" in BatchJobItem.objects.get(batch=batch).error


def test_renewed_lease_is_not_taken_back(submit: Submit) -> None:
    batch = submit("demo.noop", [{}])
    items = claim(batch, worker="w1", lease=0.001)
    services.renew_leases(worker_id="w1", item_ids=[i.id for i in items], lease_seconds=60)
    assert services.recover_expired_leases() == 0


def test_expired_lease_in_cancelling_batch_cancels_the_item(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 2)
    items = claim(batch, worker="dead")
    services.request_cancel(batch_id=batch.id)
    expire(items)
    services.recover_expired_leases()
    batch.refresh_from_db()
    assert (batch.status, batch.cancelled_items) == ("cancelled", 2)


def test_released_items_are_pending_again_without_counting_the_attempt(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 3)
    items = claim(batch, worker="w1")
    assert services.release_items(batch_id=batch.id, worker_id="w1", item_ids=[i.id for i in items]) == 3
    batch.refresh_from_db()
    assert (batch.running_items, batch.pending_items) == (0, 3)
    assert set(BatchJobItem.objects.filter(batch=batch).values_list("attempts", flat=True)) == {0}


def test_worker_id_in_use_by_a_live_worker_is_refused() -> None:
    services.register_worker(worker_id="w", hostname="h", pid=1, concurrency=4, lease_seconds=30)
    with pytest.raises(services.InvalidValue):
        services.register_worker(worker_id="w", hostname="h", pid=2, concurrency=4, lease_seconds=30)
    services.unregister_worker(worker_id="w")
    services.register_worker(worker_id="w", hostname="h", pid=3, concurrency=4, lease_seconds=30)
    assert BatchWorker.objects.get(pk="w").pid == 3


# --- the step statement on PostgreSQL -------------------------------------------------------
