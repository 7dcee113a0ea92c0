"""Pause and resume: the services (guarded, idempotent, through the permits), admin actions, commands."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.test import Client

from batch import selectors, services
from batch.models import AuditAction, BatchAuditEvent, BatchJob, BatchPermit, BatchStatus, ItemStatus
from batch.services import Outcome, PermitRequest, Transition

pytestmark = pytest.mark.django_db

LEASE = 30.0


def claim(batch: BatchJob, worker: str = "w1", limit: int = 1) -> list[services.ClaimedItem]:
    return services.claim_items(batch_id=batch.pk, worker_id=worker, limit=limit, lease_seconds=LEASE)


def finish(batch: BatchJob, items: list[services.ClaimedItem], worker: str = "w1") -> BatchJob:
    outcomes = [Outcome(item.id, ItemStatus.SUCCEEDED) for item in items]
    return services.complete_items(batch_id=batch.pk, worker_id=worker, outcomes=outcomes)


def grant_for(batch: BatchJob, worker: str, *, holding: int, demand: int) -> services.Grant:
    request = PermitRequest(batch.pk, holding=holding, demand=demand)
    return services.sync_permits(worker_id=worker, lease_seconds=LEASE, requests=[request])[batch.pk]


def fresh(batch: BatchJob) -> BatchJob:
    return BatchJob.objects.get(pk=batch.pk)


def actions(batch: BatchJob) -> list[str]:
    return list(BatchAuditEvent.objects.filter(batch=batch).order_by("at", "id").values_list("action", flat=True))


def test_pause_of_a_pending_batch_and_resume_back_to_pending(submit: Callable[..., BatchJob], user: Any) -> None:
    batch = submit("demo.noop", [{}] * 3, created_by=user)
    paused = services.pause_batch(batch_id=batch.pk, by=user)
    assert (paused.outcome, fresh(batch).status) == (Transition.APPLIED, BatchStatus.PAUSED)
    assert selectors.pause_settled(fresh(batch))
    resumed = services.resume_batch(batch_id=batch.pk, by=user)
    assert (resumed.outcome, fresh(batch).status) == (Transition.APPLIED, BatchStatus.PENDING), "nothing ever started"
    assert actions(batch) == [AuditAction.SUBMITTED, AuditAction.PAUSE_REQUESTED, AuditAction.RESUMED]
    event = BatchAuditEvent.objects.get(batch=batch, action=AuditAction.PAUSE_REQUESTED)
    assert (event.actor_name, event.details["status"]) == ("alice", "pending")


def test_a_paused_batch_gets_no_permits_and_hands_out_no_items(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 6, max_parallel=4)
    running = claim(batch, limit=2)
    assert fresh(batch).status == BatchStatus.RUNNING
    services.pause_batch(batch_id=batch.pk)
    assert grant_for(batch, "w2", holding=0, demand=4).allowed == 0
    mine = grant_for(batch, "w1", holding=2, demand=4)
    assert (mine.allowed, mine.permits) == (0, 2), "the permits still cover what runs there"
    assert claim(batch, worker="w3", limit=4) == []
    assert selectors.runnable_batches() == []
    assert not selectors.pause_settled(fresh(batch)), "two items still run"
    after = finish(batch, running)
    assert (after.status, after.running_items, after.succeeded_items) == (BatchStatus.PAUSED, 0, 2)
    assert not selectors.pause_settled(after), "w1 has not given its permits back yet"
    assert grant_for(batch, "w1", holding=0, demand=0).permits == 0
    assert selectors.pause_settled(fresh(batch))
    assert services.resume_batch(batch_id=batch.pk).batch.status == BatchStatus.RUNNING  # type: ignore[union-attr]
    assert [row[0] for row in selectors.runnable_batches()] == [batch.pk]
    services.release_permits(worker_id="w2", batch_id=batch.pk)  # w2 and w3 asked while paused
    assert len(claim(batch, worker="w3", limit=4)) == 4


def test_expired_permits_of_a_lost_worker_do_not_hold_a_pause_up(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 2)
    services.pause_batch(batch_id=batch.pk)
    BatchPermit.objects.create(batch=batch, worker_id="gone", permits=2, demand=2, expires_at="2000-01-01T00:00:00Z")
    assert selectors.pause_settled(fresh(batch))


def test_pause_is_refused_when_paused_cancelling_or_finished_and_writes_nothing(
    submit: Callable[..., BatchJob],
) -> None:
    batch = submit("demo.noop", [{}] * 2)
    assert services.pause_batch(batch_id=batch.pk).outcome is Transition.APPLIED
    again = services.pause_batch(batch_id=batch.pk)
    assert (again.outcome, again.batch.status) == (Transition.REFUSED, BatchStatus.PAUSED)  # type: ignore[union-attr]
    cancelling = submit("demo.noop", [{}] * 2)
    claim(cancelling)
    services.request_cancel(batch_id=cancelling.pk)
    assert services.pause_batch(batch_id=cancelling.pk).outcome is Transition.REFUSED
    done = submit("demo.noop", [{}])
    finish(done, claim(done))
    assert services.pause_batch(batch_id=done.pk).outcome is Transition.REFUSED
    assert services.pause_batch(batch_id=uuid.uuid4()).outcome is Transition.NOT_FOUND
    assert BatchAuditEvent.objects.filter(action=AuditAction.PAUSE_REQUESTED).count() == 1


def test_resume_is_refused_unless_paused(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 2)
    assert services.resume_batch(batch_id=batch.pk).outcome is Transition.REFUSED
    assert services.resume_batch(batch_id=uuid.uuid4()).outcome is Transition.NOT_FOUND
    services.pause_batch(batch_id=batch.pk)
    assert services.resume_batch(batch_id=batch.pk).outcome is Transition.APPLIED
    assert services.resume_batch(batch_id=batch.pk).outcome is Transition.REFUSED
    assert actions(batch).count(AuditAction.RESUMED) == 1


def test_cancel_of_a_paused_batch_cancels_pending_and_ends_cancelled_once_nothing_runs(
    submit: Callable[..., BatchJob],
) -> None:
    batch = submit("demo.noop", [{}] * 5)
    running = claim(batch)
    services.pause_batch(batch_id=batch.pk)
    result = services.request_cancel(batch_id=batch.pk)
    assert result.outcome is services.CancelOutcome.REQUESTED
    assert (result.batch.status, result.batch.cancelled_items) == (BatchStatus.CANCELLING, 4)  # type: ignore[union-attr]
    outcome = Outcome(running[0].id, ItemStatus.CANCELLED)
    after = services.complete_items(batch_id=batch.pk, worker_id="w1", outcomes=[outcome])
    assert (after.status, after.cancelled_items) == (BatchStatus.CANCELLED, 5)


def test_resize_works_on_a_paused_batch_and_applies_after_resume(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 5, max_parallel=1)
    services.pause_batch(batch_id=batch.pk)
    assert services.resize_batch(batch_id=batch.pk, max_parallel=3) is not None
    assert grant_for(batch, "w1", holding=0, demand=4).allowed == 0
    services.resume_batch(batch_id=batch.pk)
    assert grant_for(batch, "w1", holding=0, demand=4).allowed == 3


def test_a_paused_batch_whose_last_items_finish_ends_by_itself(submit: Callable[..., BatchJob]) -> None:
    batch = submit("demo.noop", [{}] * 2, max_parallel=2)
    running = claim(batch, limit=2)
    services.pause_batch(batch_id=batch.pk)
    assert finish(batch, running).status == BatchStatus.SUCCEEDED


def test_lease_recovery_in_a_paused_batch_puts_items_back_pending(submit: Callable[..., BatchJob]) -> None:
    from batch.models import BatchJobItem

    batch = submit("demo.noop", [{}] * 2)
    claim(batch)
    services.pause_batch(batch_id=batch.pk)
    BatchJobItem.objects.filter(batch=batch, status=ItemStatus.RUNNING).update(lease_expires_at="2000-01-01T00:00:00Z")
    assert services.recover_expired_leases() == 1
    after = fresh(batch)
    assert (after.status, after.running_items, after.pending_items) == (BatchStatus.PAUSED, 0, 2)


# --- admin actions --------------------------------------------------------------------------

CHANGELIST = "/admin/batch/batchjob/"


def staff_client(make_user: Callable[..., Any], *perms: str) -> Client:
    who = make_user(f"staff-{'-'.join(perms) or 'none'}", is_staff=True)
    who.user_permissions.add(*Permission.objects.filter(codename__in=perms, content_type__app_label="batch"))
    client = Client()
    client.force_login(who)
    return client


def run_action(client: Client, action: str, batches: list[BatchJob]) -> list[str]:
    data = {"action": action, "_selected_action": [str(b.pk) for b in batches]}
    response = client.post(CHANGELIST, data, follow=True)
    assert response.status_code == 200
    return [str(m) for m in response.context["messages"]]


def test_admin_pause_and_resume_actions_report_what_they_did(
    make_user: Callable[..., Any], submit: Callable[..., BatchJob], user: Any
) -> None:
    one, two = submit("demo.noop", [{}], created_by=user), submit("demo.noop", [{}], created_by=user)
    services.pause_batch(batch_id=two.pk)
    client = staff_client(make_user, "view_batchjob", "pause_batchjob")
    notes = run_action(client, "pause_batches", [one, two])
    assert any("Paused 1 batch(es)" in n for n in notes) and any("1 skipped" in n for n in notes), notes
    assert (fresh(one).status, fresh(two).status) == (BatchStatus.PAUSED, BatchStatus.PAUSED)
    notes = run_action(client, "resume_batches", [one, two])
    assert any("Resumed 2 batch(es)" in n for n in notes), notes
    assert (fresh(one).status, fresh(two).status) == (BatchStatus.PENDING, BatchStatus.PENDING)
    assert BatchAuditEvent.objects.get(batch=one, action=AuditAction.RESUMED).actor_name.startswith("staff-")


def test_admin_pause_actions_need_the_pause_permission(
    make_user: Callable[..., Any], submit: Callable[..., BatchJob], user: Any
) -> None:
    batch = submit("demo.noop", [{}], created_by=user)
    client = staff_client(make_user, "view_batchjob", "cancel_batchjob")
    page = client.get(CHANGELIST).content.decode()
    assert "pause_batches" not in page and "resume_batches" not in page and "cancel_batches" in page
    client.post(CHANGELIST, {"action": "pause_batches", "_selected_action": [str(batch.pk)]})
    assert fresh(batch).status == BatchStatus.PENDING


# --- commands -------------------------------------------------------------------------------


def test_pausebatch_and_resumebatch_commands(submit: Callable[..., BatchJob], capsys: Any) -> None:
    batch = submit("demo.noop", [{}] * 2)
    call_command("pausebatch", str(batch.pk), "--wait", "1")
    assert capsys.readouterr().out.strip() == f"{batch.pk} paused (running items: 0)"
    with pytest.raises(CommandError, match="cannot be paused"):
        call_command("pausebatch", str(batch.pk))
    call_command("resumebatch", str(batch.pk))
    assert capsys.readouterr().out.strip() == f"{batch.pk} pending"
    with pytest.raises(CommandError, match="is not paused"):
        call_command("resumebatch", str(batch.pk))
    with pytest.raises(CommandError, match="No batch"):
        call_command("pausebatch", str(uuid.uuid4()))
    with pytest.raises(CommandError, match="No batch"):
        call_command("resumebatch", str(uuid.uuid4()))


def test_pausebatch_wait_reports_items_still_finishing(submit: Callable[..., BatchJob], capsys: Any) -> None:
    batch = submit("demo.noop", [{}] * 2)
    claim(batch)
    call_command("pausebatch", str(batch.pk), "--wait", "0.2")
    assert capsys.readouterr().out.strip() == f"{batch.pk} paused (running items: 1, still finishing)"
    finish(batch, [services.ClaimedItem(id=i, index=0, params={}, attempt=1) for i in _running_ids(batch)])


def _running_ids(batch: BatchJob) -> list[int]:
    from batch.models import BatchJobItem

    return list(BatchJobItem.objects.filter(batch=batch, status=ItemStatus.RUNNING).values_list("pk", flat=True))
