"""Stop rules: the failure threshold, the deadline, and `status_reason` on every stop."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from batch import selectors, services
from batch.models import AuditAction, BatchAuditEvent, BatchJob, BatchJobItem, BatchStatus, ItemStatus, StatusReason
from batch.services import Outcome
from tests.problems import assert_problem

pytestmark = pytest.mark.django_db


def claim(batch: BatchJob, n: int = 1) -> list[services.ClaimedItem]:
    return services.claim_items(batch_id=batch.pk, worker_id="w", limit=n, lease_seconds=30)


def outcome(batch: BatchJob, item: services.ClaimedItem, status: str) -> BatchJob:
    return services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=[Outcome(item.id, ItemStatus(status))])


def test_the_failure_threshold_stops_the_batch_like_a_cancel_and_it_ends_failed(
    submit: Callable[..., BatchJob],
) -> None:
    batch = submit("demo.noop", [{}] * 8, max_parallel=3, max_failures=2)
    first, second, third = claim(batch, 3)
    assert outcome(batch, first, "failed").status == BatchStatus.RUNNING
    stopped = outcome(batch, second, "failed")
    assert (stopped.status, stopped.status_reason) == (BatchStatus.CANCELLING, StatusReason.FAILURE_THRESHOLD)
    assert (stopped.failed_items, stopped.running_items, stopped.cancelled_items) == (2, 1, 5)
    assert stopped.cancel_requested_at is not None
    assert claim(batch) == [], "a stopping batch hands out nothing"
    done = outcome(batch, third, "cancelled")
    assert (done.status, done.status_reason, done.cancelled_items) == (BatchStatus.FAILED, "failure threshold", 6)
    event = BatchAuditEvent.objects.get(batch=batch, action=AuditAction.CANCEL_REQUESTED)
    assert (event.actor_name, event.details["reason"]) == ("", "failure threshold")


def test_reaching_the_threshold_with_the_last_item_ends_failed_at_once(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 2, max_parallel=2, max_failures=2)
    items = claim(batch, 2)
    outcome(batch, items[0], "succeeded")
    done = outcome(batch, items[1], "failed")
    assert (done.status, done.status_reason) == (BatchStatus.FAILED, None), "one failure: below the threshold"
    again = submit("demo.noop", [{}] * 2, max_parallel=2, max_failures=1)
    items = claim(again, 2)
    outcome(again, items[0], "failed")
    done = outcome(again, items[1], "succeeded")
    assert (done.status, done.status_reason, done.succeeded_items) == (BatchStatus.FAILED, "failure threshold", 1)


def test_without_max_failures_failures_never_stop_a_batch(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 3, max_parallel=3)
    items = claim(batch, 3)
    for item in items[:2]:
        assert outcome(batch, item, "failed").status == BatchStatus.RUNNING
    assert outcome(batch, items[2], "succeeded").status == BatchStatus.FAILED


def test_the_threshold_also_stops_a_paused_batch(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 3, max_failures=1)
    item = claim(batch)[0]
    services.pause_batch(batch_id=batch.pk)
    done = outcome(batch, item, "failed")
    assert (done.status, done.status_reason, done.cancelled_items) == (BatchStatus.FAILED, "failure threshold", 2)


def test_a_user_cancel_records_reason_requested(submit: Callable[..., BatchJob], user: Any) -> None:
    batch = submit("demo.noop", [{}] * 2)
    result = services.request_cancel(batch_id=batch.pk, by=user)
    assert result.batch is not None and result.batch.status_reason == StatusReason.REQUESTED
    assert BatchJob.objects.get(pk=batch.pk).status_reason == "requested"
    event = BatchAuditEvent.objects.get(batch=batch, action=AuditAction.CANCEL_REQUESTED)
    assert (event.actor_name, event.details["reason"]) == ("alice", "requested")
    finished = submit("demo.noop", [{}])
    outcome(finished, claim(finished)[0], "succeeded")
    assert BatchJob.objects.get(pk=finished.pk).status_reason is None


def _started_ago(batch: BatchJob, seconds: float) -> None:
    BatchJob.objects.filter(pk=batch.pk).update(started_at=timezone.now() - timedelta(seconds=seconds))


def test_a_passed_deadline_is_seen_by_the_database_and_cancels_with_reason_deadline(
    submit: Callable[..., BatchJob],
) -> None:
    batch = submit("demo.noop", [{}] * 3, deadline_seconds=60)
    later = submit("demo.noop", [{}] * 3, deadline_seconds=60)
    never_started = submit("demo.noop", [{}], deadline_seconds=1)
    claim(batch)
    claim(later)
    assert not selectors.batch_states([batch.pk])[batch.pk].deadline_due
    _started_ago(batch, 61)
    _started_ago(later, 30)
    states = selectors.batch_states([batch.pk, later.pk, never_started.pk])
    assert [states[b.pk].deadline_due for b in (batch, later, never_started)] == [True, False, False]
    assert services.enforce_deadlines() == 1
    cancelled = BatchJob.objects.get(pk=batch.pk)
    assert (cancelled.status, cancelled.status_reason, cancelled.cancelled_items) == (
        BatchStatus.CANCELLING,
        StatusReason.DEADLINE,
        2,
    )
    assert not selectors.batch_states([batch.pk])[batch.pk].deadline_due, "already stopping"
    assert services.enforce_deadlines() == 0, "idempotent"
    item = BatchJobItem.objects.get(batch=batch, status=ItemStatus.RUNNING)
    done = services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=[Outcome(item.id, ItemStatus.CANCELLED)])
    assert (done.status, done.status_reason) == (BatchStatus.CANCELLED, "deadline")
    assert BatchJob.objects.get(pk=later.pk).status == BatchStatus.RUNNING


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_failures", 0), ("deadline_seconds", 0), ("max_attempts", 0), ("deadline_seconds", 10**9)],
)
def test_submit_refuses_bad_stop_rules(submit: Callable[..., BatchJob], field: str, value: int) -> None:
    with pytest.raises(services.SubmitError) as caught:
        submit("demo.noop", [{}], **{field: value})
    assert field in caught.value.errors


def test_the_api_takes_and_shows_the_stop_rules(api_client: Any, no_throttle: None) -> None:
    body = {"handler": "demo.noop", "items": [{}], "max_failures": 3, "deadline_seconds": 600, "max_attempts": 2}
    response = api_client.post("/api/batches/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert (data["max_failures"], data["deadline_seconds"], data["max_attempts"], data["status_reason"]) == (
        3,
        600,
        2,
        None,
    )
    plain = api_client.post("/api/batches/", {"handler": "demo.noop", "items": [{}]}, format="json").json()
    assert (plain["max_failures"], plain["deadline_seconds"]) == (None, None)
    bad = api_client.post("/api/batches/", {**body, "max_failures": 0}, format="json")
    assert "max_failures" in assert_problem(bad, 400)["errors"]
    cancelled = api_client.delete(f"/api/batches/{data['id']}/").json()
    assert (cancelled["status"], cancelled["status_reason"]) == ("cancelled", "requested")
