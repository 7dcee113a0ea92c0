"""A worker's side of the slot permits (`services.permits` holds the cap rule): what it knows of
its permits of each batch it runs, how many it asks for, when it asks, and applying a grant.

The worker owns the `permits` mapping (batch id → `PermitState`) and its runners; these
functions read them and, on a grant, resize the runner to what the database allowed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batch import metrics, services
from batch.store import call_db

if TYPE_CHECKING:
    from batch.runner import BatchRunner
    from batch.worker import WorkerConfig


@dataclass
class PermitState:
    """What a worker knows of its permits of one batch."""

    allowed: int = 0
    permits: int = 0
    effective_parallel: int = 0
    synced_at: float = field(default_factory=time.monotonic)
    resync: bool = False  # a notification or a change asks for a sync at the next watch tick
    paused: bool = False  # the batch is paused: it wants no permits (it would get none)


def due(
    config: WorkerConfig, permits: Mapping[uuid.UUID, PermitState], runner: BatchRunner, state: PermitState
) -> bool:
    """Sync a batch's permits on a change or notification, while waiting for permits or
    owing some back, and at least once per heartbeat (which renews their lease)."""
    waiting = runner.wants_more and state.allowed < demand(config, permits, runner, state)
    owing = state.permits > max(state.allowed, len(runner.running_item_ids))
    stale = time.monotonic() - state.synced_at >= config.heartbeat_seconds
    return state.resync or waiting or owing or stale


def demand(
    config: WorkerConfig, permits: Mapping[uuid.UUID, PermitState], runner: BatchRunner, state: PermitState
) -> int:
    """Permits a batch could use here: its cap, within this worker's share of its slots."""
    if not runner.wants_more or state.paused:
        return 0
    wanting = sum(1 for s in permits.values() if not s.paused)  # a paused batch takes no share
    share = max(1, -(-config.concurrency // max(wanting, 1)))
    return min(state.effective_parallel or config.concurrency, share)


async def sync(
    config: WorkerConfig,
    permits: Mapping[uuid.UUID, PermitState],
    runners: Mapping[uuid.UUID, BatchRunner],
    batch_ids: list[uuid.UUID],
) -> None:
    """One round trip for the permits of `batch_ids`; each runner resized to its grant."""
    requests = [
        services.PermitRequest(batch_id, holding=runner.holding, demand=demand(config, permits, runner, state))
        for batch_id in batch_ids
        if (runner := runners.get(batch_id)) is not None and (state := permits.get(batch_id)) is not None
    ]
    if not requests:
        return
    sent = time.monotonic()
    grants = await call_db(
        services.sync_permits, worker_id=config.worker_id, lease_seconds=config.lease_seconds, requests=requests
    )
    metrics.observe_permit_sync(time.monotonic() - sent)
    for batch_id, grant in grants.items():
        runner, state = runners.get(batch_id), permits.get(batch_id)
        if runner is None or state is None:
            continue
        state.allowed, state.permits, state.synced_at, state.resync = grant.allowed, grant.permits, sent, False
        runner.resize(grant.allowed)
