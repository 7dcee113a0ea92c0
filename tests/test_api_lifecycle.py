"""The lifecycle endpoints: pause (with its bounded wait) and resume; codes, bodies, permissions."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from batch import services
from batch.models import BatchJob, BatchStatus, ItemStatus
from tests.conftest import grant
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


@pytest.fixture
def batch_of(submit: Callable[..., BatchJob]) -> Callable[..., BatchJob]:
    def _make(owner: Any, n: int = 2) -> BatchJob:
        return submit("demo.noop", [{}] * n, created_by=owner)

    return _make


def pause(client: Any, batch: BatchJob, query: str = "") -> Any:
    return client.post(f"/api/batches/{batch.pk}/pause/{query}")


def resume(client: Any, batch: BatchJob) -> Any:
    return client.post(f"/api/batches/{batch.pk}/resume/")


def test_pause_of_an_idle_batch_answers_200_paused_and_resume_200(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    batch = batch_of(user)
    response = pause(api_client, batch)
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "paused"
    assert api_client.get("/api/batches/?status=paused").json()["count"] == 1
    response = resume(api_client, batch)
    assert (response.status_code, response.json()["status"]) == (200, "pending")
    events = [e["action"] for e in api_client.get(f"/api/batches/{batch.pk}/events/").json()["results"]]
    assert events == ["submitted", "pause_requested", "resumed"]


def test_pause_while_an_item_runs_answers_504_and_the_batch_stays_paused(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    batch = batch_of(user, 3)
    claimed = services.claim_items(batch_id=batch.pk, worker_id="w", limit=1, lease_seconds=30)
    body = assert_problem(pause(api_client, batch, "?drain_timeout=0.2"), 504)
    assert (body["running_items"], body["batch"]["status"], body["batch"]["running_items"]) == (1, "paused", 1)
    assert "stays paused" in body["detail"]
    assert "(paused)" in assert_problem(pause(api_client, batch), 409)["detail"]
    services.complete_items(
        batch_id=batch.pk, worker_id="w", outcomes=[services.Outcome(claimed[0].id, ItemStatus.SUCCEEDED)]
    )
    after = resume(api_client, batch).json()
    assert (after["status"], after["succeeded_items"], after["pending_items"]) == ("running", 1, 2)


def test_pause_and_resume_conflicts_are_409(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user, 1)
    assert "not paused" in assert_problem(resume(api_client, batch), 409)["detail"]
    assert pause(api_client, batch).status_code == 200
    assert "paused" in assert_problem(pause(api_client, batch), 409)["detail"]
    api_client.delete(f"/api/batches/{batch.pk}/")
    assert "cancelled" in assert_problem(pause(api_client, batch), 409)["detail"]
    assert "cancelled" in assert_problem(resume(api_client, batch), 409)["detail"]


def test_pause_and_resume_of_unknown_batch_are_404(api_client: Any) -> None:
    assert_problem(api_client.post(f"/api/batches/{uuid.uuid4()}/pause/"), 404)
    assert_problem(api_client.post(f"/api/batches/{uuid.uuid4()}/resume/"), 404)


@pytest.mark.parametrize("value", ["abc", "-1", "301"])
def test_pause_with_bad_drain_timeout_is_400_and_pauses_nothing(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob], value: str
) -> None:
    batch = batch_of(user)
    assert "drain_timeout" in assert_problem(pause(api_client, batch, f"?drain_timeout={value}"), 400)["errors"]
    batch.refresh_from_db()
    assert batch.status == BatchStatus.PENDING


def test_others_batches_404_without_view_403_without_pause_and_200_with_it(
    client_for: Any, make_user: Any, user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    batch = batch_of(user)
    bob = make_user("bob")
    api = client_for(bob)
    assert_problem(pause(api, batch), 404)
    assert_problem(resume(api, batch), 404)
    grant(bob, "view_batchjob")
    assert_problem(pause(api, batch), 403)
    services.pause_batch(batch_id=batch.pk)
    assert_problem(resume(api, batch), 403)
    services.resume_batch(batch_id=batch.pk)
    done = batch_of(user, 1)
    services.request_cancel(batch_id=done.pk)
    grant(bob, "pause_batchjob")
    assert pause(api, batch).status_code == 200 and resume(api, batch).status_code == 200
    assert_problem(pause(api, done), 409)
    carol = client_for(make_user("carol"))
    assert_problem(pause(carol, done), 404)  # visibility before state: never 409


def test_pause_and_resume_need_authentication(client_for: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user)
    assert_problem(pause(client_for(None), batch), 401)
    assert_problem(resume(client_for(None), batch), 401)


@pytest.mark.django_db(transaction=True)
def test_pause_waits_until_the_running_item_finishes_and_the_worker_gives_its_permits_back(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    batch = batch_of(user, 3)
    claimed = services.claim_items(batch_id=batch.pk, worker_id="w", limit=1, lease_seconds=30)
    failures: list[BaseException] = []

    def worker() -> None:  # what a worker does on its grant of 0: the item finishes, permits go back
        try:
            deadline = time.monotonic() + 20
            while BatchJob.objects.get(pk=batch.pk).status != BatchStatus.PAUSED:
                assert time.monotonic() < deadline, "never paused"
                time.sleep(0.01)
            services.complete_items(
                batch_id=batch.pk, worker_id="w", outcomes=[services.Outcome(claimed[0].id, ItemStatus.SUCCEEDED)]
            )
            request = services.PermitRequest(batch.pk, holding=0, demand=0)
            services.sync_permits(worker_id="w", lease_seconds=30, requests=[request])
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    response = pause(api_client, batch, "?drain_timeout=20")
    thread.join(30)
    assert not failures, failures
    assert response.status_code == 200, response.content
    data = response.json()
    assert (data["status"], data["running_items"], data["succeeded_items"]) == ("paused", 0, 1)
