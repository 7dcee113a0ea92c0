"""Every state transition of batches and items. Nothing else writes batch state.

Each function is one short synchronous transaction. Transactions that touch a batch's items
lock the batch row first (`SELECT … FOR UPDATE`): that fixes a lock order (no deadlocks), keeps
the counters exact, and makes the parallelism cap hold across every worker process.

- `submit`: validate and write a whole batch (all or nothing);
- `permits`: slot permits, the one place a batch's cap is enforced;
- `execution`: the worker's hot path (starts, outcomes and the next items in one step);
- `items`: claim and complete in separate calls (scripts, tests), release on shutdown;
- `control`: cancel and resize requests;
- `lifecycle`: pause and resume (through the permits: a paused batch gets none);
- `retry`: a new batch of a finished one's failed (or cancelled) items;
- `leases`: lease renewal, recovery of a lost worker's items, worker registration.
"""

from batch.services._base import (
    CONTROL_CHANNEL,
    MAX_PARALLEL_LIMIT,
    Actor,
    CancelOutcome,
    CancelResult,
    ClaimedItem,
    InvalidValue,
    Outcome,
    Start,
    Step,
    StepResult,
    SubmitError,
    SubmitResult,
    effective_parallel,
)
from batch.services.control import cancel_deadline, enforce_deadlines, request_cancel, resize_batch
from batch.services.execution import run_step
from batch.services.items import claim_items, complete_items, release_items
from batch.services.leases import recover_expired_leases, register_worker, renew_leases, unregister_worker
from batch.services.lifecycle import Transition, TransitionResult, pause_batch, resume_batch
from batch.services.permits import Grant, PermitRequest, fair_shares, release_permits, sync_permits
from batch.services.retry import RetryOutcome, RetryResult, retry_batch
from batch.services.submit import MAX_REPORTED_ITEM_ERRORS, submit_batch

__all__ = [
    "CONTROL_CHANNEL",
    "MAX_PARALLEL_LIMIT",
    "MAX_REPORTED_ITEM_ERRORS",
    "Actor",
    "CancelOutcome",
    "CancelResult",
    "ClaimedItem",
    "Grant",
    "InvalidValue",
    "Outcome",
    "PermitRequest",
    "RetryOutcome",
    "RetryResult",
    "Start",
    "Step",
    "StepResult",
    "SubmitError",
    "SubmitResult",
    "Transition",
    "TransitionResult",
    "cancel_deadline",
    "claim_items",
    "complete_items",
    "effective_parallel",
    "enforce_deadlines",
    "fair_shares",
    "pause_batch",
    "recover_expired_leases",
    "register_worker",
    "release_items",
    "release_permits",
    "renew_leases",
    "request_cancel",
    "resize_batch",
    "resume_batch",
    "retry_batch",
    "run_step",
    "submit_batch",
    "sync_permits",
    "unregister_worker",
]
