"""Admin: changelists, read-only batch page, cancel and resize actions with their permissions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from batch import services
from batch.models import BatchJob, BatchStatus

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/batch/batchjob/"


@pytest.fixture
def admin_client_for(make_user: Callable[..., Any]) -> Callable[..., Client]:
    def _client(*perms: str, superuser: bool = False) -> Client:
        who = make_user(f"staff-{len(perms)}-{superuser}", is_staff=True, is_superuser=superuser)
        who.user_permissions.add(*Permission.objects.filter(codename__in=perms, content_type__app_label="batch"))
        client = Client()
        client.force_login(who)
        return client

    return _client


@pytest.fixture
def batches(submit: Callable[..., BatchJob], user: Any) -> list[BatchJob]:
    """Two pending batches and one that has finished."""
    first = submit("demo.sleep", [{"seconds": 1}] * 3, created_by=user, name="first")
    second = submit("demo.noop", [{}] * 2, created_by=user, name="second")
    done = submit("demo.noop", [{}], created_by=user, name="done")
    claimed = services.claim_items(batch_id=done.pk, worker_id="w", limit=1, lease_seconds=30)
    outcome = services.Outcome(item_id=claimed[0].id, status="succeeded")
    services.complete_items(batch_id=done.pk, worker_id="w", outcomes=[outcome])
    return [first, second, done]


def run_action(client: Client, action: str, batches: list[BatchJob], **extra: Any) -> Any:
    data = {"action": action, "_selected_action": [str(b.pk) for b in batches], **extra}
    return client.post(CHANGELIST, data, follow=True)


def test_changelist_shows_progress_counts_and_owner(admin_client_for: Any, batches: list[BatchJob]) -> None:
    page = admin_client_for(superuser=True).get(CHANGELIST).content.decode()
    assert page.count('class="batch-progress"') == 3
    assert 'class="batch-seg batch-seg-succeeded"' in page and ".batch-seg-running" in page  # segments and their style
    assert "1 / 1" in page and "0 / 3" in page and "alice" in page


def test_changelist_filters_and_searches(admin_client_for: Any, batches: list[BatchJob]) -> None:
    client = admin_client_for(superuser=True)
    assert client.get(CHANGELIST + "?status__exact=succeeded").context["cl"].result_count == 1
    assert client.get(CHANGELIST + "?handler=demo.noop").context["cl"].result_count == 2
    assert client.get(CHANGELIST + "?q=first").context["cl"].result_count == 1
    found = client.get(CHANGELIST + f"?q={batches[1].pk}").context["cl"].result_list
    assert [b.pk for b in found] == [batches[1].pk]


def test_batch_page_is_read_only_with_counters_and_items_link(admin_client_for: Any, batches: list[BatchJob]) -> None:
    client = admin_client_for(superuser=True)
    page = client.get(f"{CHANGELIST}{batches[0].pk}/change/").content.decode()
    assert f"?batch__id__exact={batches[0].pk}" in page and "3 items of this batch" in page
    assert 'name="status"' not in page and 'name="running_items"' not in page and 'name="_save"' not in page
    items = client.get(f"/admin/batch/batchjobitem/?batch__id__exact={batches[0].pk}&status__exact=pending")
    assert items.status_code == 200 and len(items.context["cl"].result_list) == 3


def test_batches_cannot_be_added_and_only_superusers_delete(admin_client_for: Any, batches: list[BatchJob]) -> None:
    staff = admin_client_for("view_batchjob", "delete_batchjob", "cancel_batchjob")
    assert staff.get(CHANGELIST + "add/").status_code == 403
    assert staff.get(f"{CHANGELIST}{batches[0].pk}/delete/").status_code == 403
    assert admin_client_for(superuser=True).get(f"{CHANGELIST}{batches[0].pk}/delete/").status_code == 200


def test_cancel_action_cancels_selected_and_reports_how_many(admin_client_for: Any, batches: list[BatchJob]) -> None:
    response = run_action(admin_client_for("view_batchjob", "cancel_batchjob"), "cancel_batches", batches)
    notes = [str(m) for m in response.context["messages"]]
    assert any("Cancelled 2 batch(es)" in note for note in notes), notes
    assert any("1 already finished" in note for note in notes), notes
    statuses = {b.name: b.status for b in BatchJob.objects.all()}
    assert statuses == {"first": BatchStatus.CANCELLED, "second": BatchStatus.CANCELLED, "done": BatchStatus.SUCCEEDED}


def test_staff_without_permission_neither_see_nor_run_the_actions(
    admin_client_for: Any, batches: list[BatchJob]
) -> None:
    client = admin_client_for("view_batchjob")
    page = client.get(CHANGELIST).content.decode()
    assert "cancel_batches" not in page and "resize_batches" not in page
    run_action(client, "cancel_batches", batches[:1])
    run_action(client, "resize_batches", batches[:1], apply="Apply", max_parallel="7")
    batches[0].refresh_from_db()
    assert (batches[0].status, batches[0].max_parallel) == (BatchStatus.PENDING, 4)


def test_resize_action_asks_for_max_parallel_then_applies_it(admin_client_for: Any, batches: list[BatchJob]) -> None:
    client = admin_client_for("view_batchjob", "resize_batchjob")
    form = run_action(client, "resize_batches", batches[:2])
    assert form.status_code == 200 and b'name="max_parallel"' in form.content
    invalid = run_action(client, "resize_batches", batches[:2], apply="Apply", max_parallel="0")
    assert b"errorlist" in invalid.content
    done = run_action(client, "resize_batches", batches, apply="Apply", max_parallel="7")
    notes = [str(m) for m in done.context["messages"]]
    assert any("max_parallel=7 on 2 batch(es)" in note for note in notes), notes
    assert sorted(b.max_parallel for b in BatchJob.objects.all()) == [4, 7, 7]
