"""Retry: a new batch of a finished batch's failed (or cancelled) items; service, API, admin."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from batch import services
from batch.models import AuditAction, BatchAuditEvent, BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.services import Outcome, RetryOutcome
from tests.conftest import grant
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


@pytest.fixture
def finished(submit: Callable[..., BatchJob], user: Any) -> BatchJob:
    """A finished batch of 6 items: 0 and 3 failed, 4 and 5 cancelled, the rest succeeded."""
    batch = submit("demo.noop", [{"n": i} for i in range(6)], created_by=user, max_parallel=4, max_failures=5)
    items = services.claim_items(batch_id=batch.pk, worker_id="w", limit=4, lease_seconds=30)
    results = {0: ItemStatus.FAILED, 1: ItemStatus.SUCCEEDED, 2: ItemStatus.SUCCEEDED, 3: ItemStatus.FAILED}
    services.request_cancel(batch_id=batch.pk)
    outcomes = [Outcome(item.id, results[item.index]) for item in items]
    done = services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=outcomes)
    assert (done.status, done.failed_items, done.cancelled_items) == (BatchStatus.CANCELLED, 2, 2)
    return done


def items_of(batch: BatchJob) -> list[tuple[int, int | None, dict[str, Any], str]]:
    rows = BatchJobItem.objects.filter(batch_id=batch.pk).order_by("index")
    return [(i.index, i.source_index, i.params, i.status) for i in rows]


def test_retry_copies_the_failed_items_in_order_with_their_source_index(finished: BatchJob, user: Any) -> None:
    result = services.retry_batch(batch_id=finished.pk, by=user)
    assert result.outcome is RetryOutcome.CREATED and result.batch is not None
    batch = result.batch
    assert (batch.retry_of_id, batch.handler, batch.created_by_id, batch.max_parallel) == (
        finished.pk,
        "demo.noop",
        user.pk,
        4,
    )
    assert (batch.status, batch.total_items, batch.max_failures) == (BatchStatus.PENDING, 2, 5)
    assert items_of(batch) == [(0, 0, {"n": 0}, "pending"), (1, 3, {"n": 3}, "pending")]
    assert BatchAuditEvent.objects.get(batch=finished, action=AuditAction.RETRIED).details["batch"] == str(batch.pk)
    both = services.retry_batch(batch_id=finished.pk, include=["failed", "cancelled"]).batch
    assert both is not None
    assert [(i, s) for i, s, _, _ in items_of(both)] == [(0, 0), (1, 3), (2, 4), (3, 5)]


def test_retry_is_refused_for_unfinished_or_clean_batches_and_bad_includes(
    submit: Callable[..., BatchJob], finished: BatchJob
) -> None:
    running = submit("demo.noop", [{}])
    assert services.retry_batch(batch_id=running.pk).outcome is RetryOutcome.NOT_FINISHED
    clean = submit("demo.noop", [{}])
    item = services.claim_items(batch_id=clean.pk, worker_id="w", limit=1, lease_seconds=30)[0]
    services.complete_items(batch_id=clean.pk, worker_id="w", outcomes=[Outcome(item.id, ItemStatus.SUCCEEDED)])
    assert services.retry_batch(batch_id=clean.pk).outcome is RetryOutcome.NOTHING_TO_RETRY
    assert services.retry_batch(batch_id=uuid.uuid4()).outcome is RetryOutcome.NOT_FOUND
    for include in ([], ["succeeded"], ["failed", "failed"], "failed"):
        with pytest.raises(services.InvalidValue):
            services.retry_batch(batch_id=finished.pk, include=include)
    assert not BatchJob.objects.filter(retry_of__isnull=False).exists()


def test_retry_with_an_idempotency_key_returns_the_first_retry(finished: BatchJob, user: Any) -> None:
    first = services.retry_batch(batch_id=finished.pk, by=user, idempotency_key="k1")
    again = services.retry_batch(batch_id=finished.pk, by=user, idempotency_key="k1")
    assert (first.outcome, again.outcome) == (RetryOutcome.CREATED, RetryOutcome.REPLAYED)
    assert first.batch is not None and again.batch is not None and first.batch.pk == again.batch.pk
    assert BatchJob.objects.filter(retry_of=finished).count() == 1


def retry(client: Any, batch: BatchJob, body: Any = None, **headers: Any) -> Any:
    return client.post(f"/api/batches/{batch.pk}/retry/", body or {}, format="json", headers=headers)


def test_the_retry_endpoint_answers_201_with_location_and_replays_200(api_client: Any, finished: BatchJob) -> None:
    response = retry(api_client, finished, **{"Idempotency-Key": "nightly-retry"})
    assert response.status_code == 201, response.content
    data = response.json()
    assert (data["retry_of"], data["total_items"], data["status"]) == (str(finished.pk), 2, "pending")
    assert response["Location"] == data["url"]
    items = api_client.get(data["items_url"]).json()["results"]
    assert [(i["index"], i["source_index"]) for i in items] == [(0, 0), (1, 3)]
    replay = retry(api_client, finished, **{"Idempotency-Key": "nightly-retry"})
    assert (replay.status_code, replay.json()["id"]) == (200, data["id"])
    both = retry(api_client, finished, {"include": ["failed", "cancelled"]})
    assert (both.status_code, both.json()["total_items"]) == (201, 4)


def test_the_retry_endpoint_refuses_with_problems(
    api_client: Any, user: Any, submit: Callable[..., BatchJob], finished: BatchJob
) -> None:
    errors = assert_problem(retry(api_client, finished, {"include": ["running"]}), 400)["errors"]
    assert "include" in errors
    assert "include" in assert_problem(retry(api_client, finished, {"include": []}), 400)["errors"]
    assert "nope" in assert_problem(retry(api_client, finished, {"nope": 1}), 400)["errors"]
    running = submit("demo.noop", [{}], created_by=user)
    assert "finished" in assert_problem(retry(api_client, running), 409)["detail"]
    only_failed = retry(api_client, finished).json()
    retry_batch = BatchJob.objects.get(pk=only_failed["id"])
    services.request_cancel(batch_id=retry_batch.pk)
    assert_problem(retry(api_client, BatchJob.objects.get(pk=retry_batch.pk), {"include": ["failed"]}), 409)
    assert_problem(api_client.post(f"/api/batches/{uuid.uuid4()}/retry/", {}, format="json"), 404)


def test_others_batches_404_without_view_403_without_retry(client_for: Any, make_user: Any, finished: BatchJob) -> None:
    bob = make_user("bob")
    api = client_for(bob)
    assert_problem(retry(api, finished), 404)
    grant(bob, "view_batchjob")
    assert_problem(retry(api, finished), 403)
    grant(bob, "retry_batchjob")
    response = retry(api, finished)
    assert response.status_code == 201
    new = BatchJob.objects.get(pk=response.json()["id"])
    assert new.created_by_id == finished.created_by_id, "the retry belongs to the batch's owner"
    assert BatchAuditEvent.objects.get(batch=finished, action=AuditAction.RETRIED).actor_name == "bob"


def test_admin_retry_action_needs_the_permission_and_reports(make_user: Any, finished: BatchJob) -> None:
    who = make_user("staff", is_staff=True)
    who.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_batchjob", "retry_batchjob"], content_type__app_label="batch")
    )
    client = Client()
    client.force_login(who)
    data = {"action": "retry_batches", "_selected_action": [str(finished.pk)]}
    notes = [str(m) for m in client.post("/admin/batch/batchjob/", data, follow=True).context["messages"]]
    assert any("Submitted 1 retry batch(es)" in n for n in notes), notes
    assert BatchJob.objects.filter(retry_of=finished).count() == 1
    plain = make_user("plain", is_staff=True)
    plain.user_permissions.add(Permission.objects.get(codename="view_batchjob", content_type__app_label="batch"))
    client.force_login(plain)
    assert "retry_batches" not in client.get("/admin/batch/batchjob/").content.decode()
