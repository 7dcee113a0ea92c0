"""Slot permits: the one cap rule, sharing between workers, owners, and the database's clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchPermit, ItemStatus
from batch.services import Grant, PermitRequest, fair_shares

pytestmark = pytest.mark.django_db

Submit = Callable[..., BatchJob]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def sync(batch: BatchJob, worker: str, *, holding: int = 0, demand: int = 4, lease: float = 30) -> Grant:
    request = PermitRequest(batch.pk, holding=holding, demand=demand)
    return services.sync_permits(worker_id=worker, lease_seconds=lease, requests=[request])[batch.pk]


def held(batch: BatchJob) -> dict[str, int]:
    return dict(BatchPermit.objects.filter(batch=batch).values_list("worker_id", "permits"))


# --- fair shares (pure) ---------------------------------------------------------------------


def test_fair_shares_split_evenly_and_give_what_does_not_divide_to_the_longest_waiting() -> None:
    wants = {"a": (4, None), "b": (4, T0 + timedelta(seconds=2)), "c": (4, T0)}
    assert fair_shares(4, wants) == {"a": 1, "b": 1, "c": 2}


def test_fair_shares_never_give_more_than_wanted_and_pass_the_rest_on() -> None:
    assert fair_shares(8, {"a": (1, None), "b": (10, None), "c": (10, None)}) == {"a": 1, "b": 4, "c": 3}
    assert fair_shares(8, {"a": (0, None), "b": (3, None)}) == {"a": 0, "b": 3}


def test_fair_shares_with_more_workers_than_permits_leave_some_with_none() -> None:
    wants = {w: (1, T0 + timedelta(seconds=n)) for n, w in enumerate("abcdef")}
    assert fair_shares(4, wants) == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0, "f": 0}


# --- grants against the database ------------------------------------------------------------


def test_the_permits_of_all_workers_never_exceed_the_cap(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 50, max_parallel=4)
    grants = [sync(batch, w, demand=10) for w in ("a", "b", "c", "a", "b", "c", "a")]
    assert all(g.allowed <= 4 for g in grants)
    assert sum(held(batch).values()) <= 4
    assert grants[0].allowed == 4  # alone, it gets the whole cap


def test_a_holder_gives_permits_back_to_a_waiting_worker_at_its_next_sync(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 50, max_parallel=4)
    assert sync(batch, "a").allowed == 4
    assert sync(batch, "b").allowed == 0  # all four are a's: b waits, its demand recorded
    again = sync(batch, "a", holding=4)  # a may run 2 from now on; 4 may still run until it learns
    assert (again.allowed, again.permits) == (2, 4)
    assert sync(batch, "b").allowed == 0
    assert sync(batch, "a", holding=2).permits == 2  # a's items above its share have finished
    assert sync(batch, "b").allowed == 2
    assert held(batch) == {"a": 2, "b": 2}


def test_with_more_workers_than_permits_the_permits_rotate(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 50, max_parallel=1)
    assert sync(batch, "a", demand=1).allowed == 1
    assert sync(batch, "b", demand=1).allowed == 0  # b waits from now
    assert sync(batch, "a", holding=1, demand=1).allowed == 0  # the longest waiting is first in line
    assert sync(batch, "a", holding=0, demand=1).allowed == 0  # a's item finished: its permit goes
    assert sync(batch, "b", demand=1).allowed == 1


def test_resize_and_cancel_act_through_the_next_grant(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 50, max_parallel=4)
    assert sync(batch, "a").allowed == 4
    services.resize_batch(batch_id=batch.pk, max_parallel=2)
    assert (g := sync(batch, "a", holding=4)).allowed == 2 and g.permits == 4
    services.resize_batch(batch_id=batch.pk, max_parallel=3)
    assert sync(batch, "a", holding=2).allowed == 3
    services.request_cancel(batch_id=batch.pk)
    assert sync(batch, "a", holding=3).allowed == 0


def test_a_worker_that_wants_nothing_gives_its_permits_up(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 5)
    sync(batch, "a")
    sync(batch, "a", holding=0, demand=0)
    assert held(batch) == {}


def test_expired_permits_go_to_others_by_the_databases_clock(submit: Submit, settings: Any) -> None:
    batch = submit("demo.noop", [{}] * 50, max_parallel=4)
    assert sync(batch, "a", lease=0.001).allowed == 4
    BatchPermit.objects.filter(worker_id="a").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert sync(batch, "b").allowed == 4


def test_a_worker_whose_clock_runs_ahead_takes_no_permits_early(
    submit: Submit, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = submit("demo.noop", [{}] * 50, max_parallel=4)
    assert sync(batch, "a").allowed == 4
    ahead = timezone.now() + timedelta(seconds=31)
    monkeypatch.setattr(timezone, "now", lambda: ahead)
    assert sync(batch, "b").allowed == 0  # a's 30 s lease has not expired by the database's clock


def test_owner_cap_limits_one_owners_permits_across_batches(
    submit: Submit, settings: Any, django_user_model: Any
) -> None:
    settings.BATCH_MAX_RUNNING_PER_OWNER = 6
    alice = django_user_model.objects.create_user("alice")
    bob = django_user_model.objects.create_user("bob")
    first, second = (submit("demo.noop", [{}] * 10, max_parallel=4, created_by=alice) for _ in range(2))
    other = submit("demo.noop", [{}] * 10, max_parallel=4, created_by=bob)
    assert sync(first, "w").allowed == 4
    assert sync(second, "w").allowed == 2  # alice: 6 in all
    assert sync(other, "w").allowed == 4  # bob is not held back by alice


# --- leases by the database's clock ---------------------------------------------------------


def test_a_worker_whose_clock_runs_ahead_recovers_no_healthy_item(
    submit: Submit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host 31 s ahead ran recovery and took back a healthy worker's running item (30 s
    lease): leases are judged by the database's clock now."""
    batch = submit("demo.noop", [{}] * 2)
    started = services.claim_items(batch_id=batch.pk, worker_id="healthy", limit=2, lease_seconds=30)
    assert len(started) == 2
    ahead = timezone.now() + timedelta(seconds=31)
    monkeypatch.setattr(timezone, "now", lambda: ahead)
    assert services.recover_expired_leases() == 0
    assert set(BatchJobItem.objects.filter(batch=batch).values_list("status", flat=True)) == {ItemStatus.RUNNING}


def test_lease_renewal_counts_from_the_databases_clock(submit: Submit, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = submit("demo.noop", [{}])
    (item,) = services.claim_items(batch_id=batch.pk, worker_id="w", limit=1, lease_seconds=30)
    behind = timezone.now() - timedelta(seconds=120)
    monkeypatch.setattr(timezone, "now", lambda: behind)  # a host 2 min behind renews
    services.renew_leases(worker_id="w", item_ids=[item.id], lease_seconds=30)
    expires = BatchJobItem.objects.get(pk=item.id).lease_expires_at
    assert expires is not None and expires > datetime.now(UTC) + timedelta(seconds=25)
    assert services.recover_expired_leases() == 0


def test_a_batch_starts_its_deadline_by_the_databases_clock(submit: Submit, monkeypatch: pytest.MonkeyPatch) -> None:
    """`started_at` is where `deadline_seconds` counts from: a worker an hour behind must not
    make a batch look overdue (nor one ahead give it an hour more)."""
    batch = submit("demo.noop", [{}], deadline_seconds=60)
    behind = timezone.now() - timedelta(hours=1)
    monkeypatch.setattr(timezone, "now", lambda: behind)
    services.claim_items(batch_id=batch.pk, worker_id="w", limit=1, lease_seconds=30)
    started_at = BatchJob.objects.get(pk=batch.pk).started_at
    assert started_at is not None and abs((started_at - datetime.now(UTC)).total_seconds()) < 5
    assert services.enforce_deadlines() == 0
