"""A property test of the hot path against a model of its rules, on each database.

Hypothesis drives random sequences of fetches, starts, outcomes (retries after a backoff among
them), give-backs, retries of a step whose reply was lost, cancels, lease recoveries and resizes
through the real services, and
after every step compares each item's (status, owner) and the batch's counters and status with
a small Python model of the rules. The same test runs on SQLite and on PostgreSQL, so both
databases are held to the same rules, and to each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from batch import services
from batch.models import BatchJob, BatchJobItem, ItemStatus
from batch.selectors import counter_mismatches
from batch.services import Outcome, Start, Step

pytestmark = pytest.mark.django_db

WORKERS = ("w1", "w2")
ITEMS = 6
FINAL = (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED)


@dataclass
class Item:
    status: str = ItemStatus.PENDING
    owner: str = ""
    attempts: int = 0
    waiting: bool = False  # pending again after a failed attempt, its backoff not yet over


@dataclass
class Model:
    items: dict[int, Item]
    status: str = "pending"
    max_attempts: int = 3
    ids: list[int] = field(default_factory=list)

    def mine(self, worker: str, status: str) -> list[int]:
        return [i for i in self.ids if self.items[i].owner == worker and self.items[i].status == status]

    def step(self, worker: str, step: Step) -> None:
        started = False
        for start in step.started:
            item = self.items[start.item_id]
            if item.status == ItemStatus.PENDING and item.owner == worker:
                item.status, item.attempts, started = ItemStatus.RUNNING, item.attempts + 1, True
        for outcome in step.outcomes:
            item = self.items[outcome.item_id]
            if item.status == ItemStatus.RUNNING and item.owner == worker:
                item.status, item.owner = outcome.status, ""
                if outcome.retry_in is not None:
                    item.waiting = self.status != "cancelling"
                    item.status = ItemStatus.PENDING if item.waiting else ItemStatus.CANCELLED
        for item_id in step.give_back:
            item = self.items[item_id]
            if item.status == ItemStatus.PENDING and item.owner == worker:
                item.owner = ""
                if self.status == "cancelling":
                    item.status = ItemStatus.CANCELLED
        self.settle(started=started)
        if self.status in ("pending", "running"):
            free = [i for i in self.ids if self.items[i].status == ItemStatus.PENDING and not self.items[i].owner]
            free = [i for i in free if not self.items[i].waiting]
            for item_id in free[: step.fetch]:
                self.items[item_id].owner = worker

    def settle(self, *, started: bool = False) -> None:
        states = [item.status for item in self.items.values()]
        if self.status == "pending" and started:
            self.status = "running"
        if self.status not in ("succeeded", "failed", "cancelled") and all(s in FINAL for s in states):
            if self.status == "cancelling":
                self.status = "cancelled"
            elif all(s == ItemStatus.SUCCEEDED for s in states):
                self.status = "succeeded"
            else:
                self.status = "failed"

    def cancel(self) -> None:
        if self.status in ("pending", "running"):
            self.status = "cancelling"
            for item in self.items.values():
                if item.status == ItemStatus.PENDING and not item.owner:
                    item.status = ItemStatus.CANCELLED
            self.settle()

    def recover(self, worker: str) -> None:
        """`worker` died: its leases expired."""
        for item in self.items.values():
            if item.owner != worker:
                continue
            item.owner = ""
            if item.status == ItemStatus.RUNNING:
                if self.status == "cancelling":
                    item.status = ItemStatus.CANCELLED
                elif item.attempts >= self.max_attempts:
                    item.status = ItemStatus.FAILED
                else:
                    item.status = ItemStatus.PENDING
            elif self.status == "cancelling":
                item.status = ItemStatus.CANCELLED
        self.settle()


def outcome(item_id: int, status: str) -> Outcome:
    if status == "retry":  # a failed attempt to be tried again after its backoff
        return Outcome(item_id, ItemStatus.PENDING, error="ConnectionError: reset", retry_in=30)
    return Outcome(item_id, ItemStatus(status))


class StepMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.batch = services.submit_batch(handler="demo.noop", items=[{}] * ITEMS, max_parallel=4).batch
        ids = list(BatchJobItem.objects.filter(batch=self.batch).order_by("index").values_list("pk", flat=True))
        self.model = Model(items={i: Item() for i in ids}, ids=ids)
        self.last: tuple[str, Step] | None = None

    def _step(self, worker: str, step: Step) -> None:
        services.run_step(batch_id=self.batch.pk, worker_id=worker, lease_seconds=30, step=step)
        self.model.step(worker, step)
        self.last = (worker, step)

    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 3))
    def fetch(self, worker: str, n: int) -> None:
        self._step(worker, Step(fetch=n))

    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 2), finish=st.sampled_from([None, "succeeded", "retry"]))
    def start(self, worker: str, n: int, finish: str | None) -> None:
        held = self.model.mine(worker, ItemStatus.PENDING)[:n]
        if not held:
            return
        outcomes = [outcome(held[0], finish)] if finish else []  # started and done in one write
        self._step(worker, Step(started=[Start(i) for i in held], outcomes=outcomes))

    @rule(worker=st.sampled_from(WORKERS), status=st.sampled_from([*FINAL, "retry"]), fetch=st.integers(0, 2))
    def finish(self, worker: str, status: str, fetch: int) -> None:
        running = self.model.mine(worker, ItemStatus.RUNNING)[:1]
        if running:
            self._step(worker, Step(outcomes=[outcome(running[0], status)], fetch=fetch))

    @rule()
    def backoffs_pass(self) -> None:
        BatchJobItem.objects.filter(batch=self.batch, available_at__isnull=False).update(available_at=None)
        for item in self.model.items.values():
            item.waiting = False

    @rule(worker=st.sampled_from(WORKERS))
    def give_back(self, worker: str) -> None:
        held = self.model.mine(worker, ItemStatus.PENDING)
        if held:
            self._step(worker, Step(give_back=held[-1:]))

    @precondition(lambda self: self.last is not None)
    @rule()
    def retry_after_a_lost_reply(self) -> None:
        assert self.last is not None
        self._step(*self.last)

    @rule()
    def cancel(self) -> None:
        services.request_cancel(batch_id=self.batch.pk)
        self.model.cancel()

    @rule(worker=st.sampled_from(WORKERS))
    def worker_dies(self, worker: str) -> None:
        past = timezone.now() - timedelta(seconds=60)
        BatchJobItem.objects.filter(batch=self.batch, lease_owner=worker).update(lease_expires_at=past)
        services.recover_expired_leases()
        self.model.recover(worker)

    @rule(n=st.integers(1, 6))
    def resize(self, n: int) -> None:
        services.resize_batch(batch_id=self.batch.pk, max_parallel=n)  # changes nothing in the step

    @invariant()
    def database_matches_the_model(self) -> None:
        rows = {
            pk: (status, owner)
            for pk, status, owner in BatchJobItem.objects.filter(batch=self.batch).values_list(
                "pk", "status", "lease_owner"
            )
        }
        assert rows == {pk: (item.status, item.owner) for pk, item in self.model.items.items()}
        batch = BatchJob.objects.get(pk=self.batch.pk)
        assert batch.status == self.model.status
        assert counter_mismatches(batch) == {}


def test_the_step_follows_the_model_of_its_rules(request: Any) -> None:
    run_state_machine_as_test(
        StepMachine,
        settings=settings(
            max_examples=int(os.environ.get("BATCH_MODEL_EXAMPLES", "100")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
