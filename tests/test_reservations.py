"""Reservations and handovers in `complete_and_claim`, on SQLite and PostgreSQL.

A worker may hold pending items leased to it (reserved) and start one in place of a running
item of its own that finished. The database's running count must never drop below what runs,
so the handover is written in the same step as the completion it replaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

import pytest
from django.utils import timezone

from batch import services
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.services import Claim, Handover, Outcome

pytestmark = pytest.mark.django_db

Submit = Callable[..., BatchJob]


def step(
    batch: BatchJob,
    *,
    worker: str = "w1",
    done: Sequence[int] = (),
    handed: Sequence[int] = (),
    claim: int = 0,
    promote: Sequence[int] = (),
    reserve: int = 0,
    lease: float = 30,
    give_back: Sequence[int] = (),
) -> Claim:
    return services.complete_and_claim(
        batch_id=batch.id,
        worker_id=worker,
        outcomes=[Outcome(item_id, ItemStatus.SUCCEEDED, result={"ok": item_id}) for item_id in done],
        claim_limit=claim,
        lease_seconds=lease,
        started=[Handover(item_id) for item_id in handed],
        promote=promote,
        reserve_limit=reserve,
        give_back=give_back,
    )


def item(item_id: int) -> BatchJobItem:
    return BatchJobItem.objects.get(pk=item_id)


def ids(items: Sequence[services.ClaimedItem]) -> list[int]:
    return [i.id for i in items]


def test_a_claim_reserves_pending_items_that_stay_pending_and_out_of_the_cap(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 10, max_parallel=2)
    first = step(batch, claim=2, reserve=3)
    assert [i.index for i in first.items] == [0, 1]
    assert [i.index for i in first.reserved] == [2, 3, 4]
    assert [i.attempt for i in first.reserved] == [1, 1, 1], "the attempt a reserved item will run as"
    batch.refresh_from_db()
    assert (batch.running_items, batch.pending_items) == (2, 8)
    reserved = item(first.reserved[0].id)
    assert (reserved.status, reserved.lease_owner, reserved.attempts) == (ItemStatus.PENDING, "w1", 0)
    assert reserved.lease_expires_at is not None and reserved.started_at is None
    other = step(batch, worker="w2", claim=2, reserve=2)
    assert other.items == [], "the cap is full"
    assert [i.index for i in other.reserved] == [5, 6], "another worker never gets w1's reservations"


def test_a_handover_is_written_with_the_completion_it_replaces(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 6, max_parallel=2)
    first = step(batch, claim=2, reserve=2)
    before = timezone.now()
    second = step(batch, done=[first.items[0].id], handed=[first.reserved[0].id])
    assert second.refused == [] and not second.over_cap
    batch.refresh_from_db()
    assert (batch.running_items, batch.succeeded_items, batch.pending_items) == (2, 1, 3)
    started = item(first.reserved[0].id)
    assert (started.status, started.attempts, started.lease_owner) == (ItemStatus.RUNNING, 1, "w1")
    assert started.started_at is not None and started.started_at <= timezone.now()
    assert started.started_at >= before - timedelta(seconds=1)


def test_a_handed_over_item_may_finish_in_the_same_step(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4, max_parallel=1)
    first = step(batch, claim=1, reserve=3)
    a, (b, c, d) = first.items[0].id, ids(first.reserved)
    # a finished, b ran in its slot and finished, c ran in that slot and finished, d runs now.
    result = step(batch, done=[a, b, c], handed=[b, c, d])
    assert result.refused == []
    batch.refresh_from_db()
    assert (batch.running_items, batch.succeeded_items, batch.status) == (1, 3, BatchStatus.RUNNING)
    assert [item(i).attempts for i in (a, b, c, d)] == [1, 1, 1, 1]
    assert item(c).status == ItemStatus.SUCCEEDED and item(c).started_at is not None
    step(batch, done=[d])
    batch.refresh_from_db()
    assert (batch.status, batch.succeeded_items, batch.running_items) == (BatchStatus.SUCCEEDED, 4, 0)


def test_a_retried_step_does_not_count_twice(submit: Submit) -> None:
    """The connection dropped after the commit: the worker writes the same step again."""
    batch = submit("demo.noop", [{}] * 4, max_parallel=1)
    first = step(batch, claim=1, reserve=2)
    a, (b, c) = first.items[0].id, ids(first.reserved)
    step(batch, done=[a, b], handed=[b, c])
    again = step(batch, done=[a, b], handed=[b, c])
    assert c not in again.refused, "c runs under w1 since the first attempt: not a lost reservation"
    batch.refresh_from_db()
    assert (batch.running_items, batch.succeeded_items, batch.pending_items) == (1, 2, 1)
    assert item(c).status == ItemStatus.RUNNING


def test_a_free_slot_takes_the_workers_own_reservations_first(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 8, max_parallel=3)
    first = step(batch, claim=1, reserve=3)
    reserved = ids(first.reserved)
    second = step(batch, claim=2, promote=reserved)
    assert ids(second.items) == reserved[:2], "promoted in index order, within the cap"
    batch.refresh_from_db()
    assert batch.running_items == 3
    third = step(batch, claim=1, promote=reserved[2:])
    assert third.items == [], "the cap is full: the reservation stays"
    assert item(reserved[2]).status == ItemStatus.PENDING and item(reserved[2]).lease_owner == "w1"


def test_a_lost_reservation_refuses_its_handover(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4, max_parallel=1)
    first = step(batch, claim=1, reserve=1, lease=0.01)
    BatchJobItem.objects.filter(pk=first.reserved[0].id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    BatchJobItem.objects.filter(pk=first.items[0].id).update(lease_expires_at=timezone.now() + timedelta(seconds=60))
    assert services.recover_expired_leases() == 1
    assert item(first.reserved[0].id).lease_owner == ""
    taken = step(batch, worker="w2", reserve=1)
    assert ids(taken.reserved) == [first.reserved[0].id]
    result = step(batch, done=[first.items[0].id], handed=[first.reserved[0].id])
    assert result.refused == [first.reserved[0].id]
    batch.refresh_from_db()
    assert batch.running_items == 0, "a refused handover is not counted as running"


def test_lowering_the_cap_reports_over_cap_to_the_handing_worker(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 10, max_parallel=3)
    first = step(batch, claim=3, reserve=3)
    services.resize_batch(batch_id=batch.id, max_parallel=1)
    result = step(batch, done=[first.items[0].id], handed=[first.reserved[0].id])
    assert result.over_cap, "3 run against a cap of 1: the worker must stop handing over"
    assert step(batch, claim=1).items == []


def test_cancel_leaves_reservations_to_their_worker_which_gives_them_back_cancelled(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 6, max_parallel=1)
    first = step(batch, claim=1, reserve=2)
    result = services.request_cancel(batch_id=batch.id)
    assert result.batch is not None
    assert (result.batch.status, result.batch.cancelled_items) == (BatchStatus.CANCELLING, 3)
    step(batch, done=[first.items[0].id])
    batch.refresh_from_db()
    assert batch.status == BatchStatus.CANCELLING, "reserved items have not stopped yet"
    assert services.release_items(batch_id=batch.id, worker_id="w1", item_ids=ids(first.reserved)) == 2
    batch.refresh_from_db()
    assert (batch.status, batch.cancelled_items, batch.succeeded_items) == (BatchStatus.CANCELLED, 5, 1)


def test_shutdown_gives_reservations_back_unreserved(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4, max_parallel=1)
    first = step(batch, claim=1, reserve=2)
    released = services.release_items(
        batch_id=batch.id, worker_id="w1", item_ids=[*ids(first.items), *ids(first.reserved)]
    )
    assert released == 3
    batch.refresh_from_db()
    assert (batch.running_items, batch.pending_items) == (0, 4)
    assert not BatchJobItem.objects.exclude(lease_owner="").exists()
    assert [i.index for i in step(batch, worker="w2", claim=1).items] == [0]


def test_reservations_of_a_lost_worker_expire_and_in_a_cancelling_batch_end_cancelled(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 3, max_parallel=1)
    first = step(batch, claim=1, reserve=2)
    services.request_cancel(batch_id=batch.id)
    BatchJobItem.objects.filter(batch=batch).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.recover_expired_leases() == 3
    batch.refresh_from_db()
    assert (batch.status, batch.cancelled_items) == (BatchStatus.CANCELLED, 3)
    assert item(first.reserved[0].id).error == ""


def test_renewal_extends_reservations_too(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 3, max_parallel=1)
    first = step(batch, claim=1, reserve=2, lease=1)
    leased = [*ids(first.items), *ids(first.reserved)]
    assert services.renew_leases(worker_id="w1", item_ids=leased, lease_seconds=120) == 3
    assert services.renew_leases(worker_id="w2", item_ids=leased, lease_seconds=120) == 0
    soonest = min(i.lease_expires_at for i in BatchJobItem.objects.filter(pk__in=leased) if i.lease_expires_at)
    assert soonest > timezone.now() + timedelta(seconds=60)


def test_a_finished_or_cancelling_batch_reserves_nothing(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4, max_parallel=1)
    step(batch, claim=1)
    services.request_cancel(batch_id=batch.id)
    assert step(batch, reserve=3).reserved == []


def test_a_step_gives_reservations_back_with_the_last_outcomes_of_a_cancel(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 6, max_parallel=1)
    first = step(batch, claim=1, reserve=2)
    services.request_cancel(batch_id=batch.id)
    other = step(batch, worker="w2", give_back=ids(first.reserved))
    assert other.status == BatchStatus.CANCELLING, "another worker cannot give w1's reservations back"
    result = step(batch, done=[first.items[0].id], give_back=ids(first.reserved))
    assert result.status == BatchStatus.CANCELLED, "one step: the last outcome and the reservations"
    batch.refresh_from_db()
    assert (batch.succeeded_items, batch.cancelled_items, batch.running_items) == (1, 5, 0)
    assert all(item(i).finished_at is not None for i in ids(first.reserved))


def test_a_step_gives_reservations_back_unreserved_in_a_running_batch(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4, max_parallel=1)
    first = step(batch, claim=1, reserve=2)
    step(batch, give_back=ids(first.reserved))
    assert [(item(i).status, item(i).lease_owner) for i in ids(first.reserved)] == [(ItemStatus.PENDING, "")] * 2
    batch.refresh_from_db()
    assert (batch.running_items, batch.pending_items) == (1, 3)
    assert [i.index for i in step(batch, worker="w2", reserve=5).reserved] == [1, 2, 3]


def test_a_claim_that_finds_the_cap_full_reserves_nothing_per_claim(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 20, max_parallel=2)
    first = services.complete_and_claim(
        batch_id=batch.id, worker_id="w1", outcomes=[], claim_limit=2, lease_seconds=30, reserve_per_claim=3
    )
    assert (len(first.items), len(first.reserved)) == (2, 6), "3 reserved for each item started"
    second = services.complete_and_claim(
        batch_id=batch.id, worker_id="w2", outcomes=[], claim_limit=2, lease_seconds=30, reserve_per_claim=3
    )
    assert (second.items, second.reserved) == ([], []), "no slot: nothing to hand over, nothing held"


# --- worker share: a worker whose claim finds the cap taken ----------------------------------


def test_a_claim_that_finds_the_cap_taken_divides_it_among_the_workers(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 20, max_parallel=4)
    first = step(batch, worker="A", claim=4, reserve=4)
    assert len(first.items) == 4 and first.share is None  # alone: no share
    refused = step(batch, worker="B", claim=4)
    assert refused.items == [] and refused.share is None  # the refused one may take any room
    # A hears it with its next step and stops handing over above 2; its completions free room.
    handing = step(batch, worker="A", done=[first.items[0].id], handed=[first.reserved[0].id])
    assert handing.share == 2  # 4 slots over A and B
    step(batch, worker="A", done=[first.items[1].id, first.items[2].id])
    taken = step(batch, worker="B", claim=4)
    assert len(taken.items) == 2
    assert BatchJob.objects.get(pk=batch.id).running_items == 4


def test_the_share_counts_every_worker_running_items_and_lapses(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 20, max_parallel=4)
    step(batch, worker="A", claim=2)
    step(batch, worker="B", claim=2)
    assert step(batch, worker="C", claim=1).items == []
    # 4 // 3 workers: rounded down, so A and B at their share leave room for C
    assert step(batch, worker="A").share == step(batch, worker="B").share == 1
    BatchJob.objects.filter(pk=batch.id).update(worker_share_until=timezone.now() - timedelta(seconds=1))
    assert step(batch, worker="A").share is None, "nobody has been refused lately: no share"


def test_a_claim_that_gets_items_or_finds_nothing_pending_sets_no_share(submit: Submit) -> None:
    batch = submit("demo.noop", [{}] * 4, max_parallel=4)
    step(batch, worker="A", claim=2)
    step(batch, worker="B", claim=4)  # got the other 2
    step(batch, worker="C", claim=1)  # cap taken, but nothing waits
    assert step(batch, worker="A").share is None
    assert step(batch, worker="B").share is None


def test_handing_over_the_last_pending_item_with_a_claim_sets_no_share(submit: Submit) -> None:
    """Found in review: PostgreSQL judged "items wait" before the step's own handovers."""
    batch = submit("demo.noop", [{}] * 3, max_parallel=2)
    first = step(batch, worker="A", claim=2, reserve=1)  # runs 0 and 1, reserves 2 (the last)
    step(batch, worker="A", done=[first.items[0].id], handed=[first.reserved[0].id], claim=1)
    assert BatchJob.objects.get(pk=batch.id).worker_share_until is None, "nothing waits: nobody was refused"
