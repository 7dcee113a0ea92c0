"""Who may do what to which batch: one rule for the API, the admin, the dashboard and the WebSocket.

- Your own batches: any authenticated user views, resizes and cancels them (the contract).
- Submitting: any authenticated user; with BATCH_SUBMIT_REQUIRES_PERMISSION=1 only users
  with `batch.add_batchjob`.
- Other users' batches: `batch.view_batchjob` to see them (API, dashboard, WebSocket, admin),
  `batch.resize_batchjob` to resize, `batch.cancel_batchjob` to cancel and
  `batch.pause_batchjob` to pause and resume them, `batch.retry_batchjob` to retry them.
  Superusers have every permission; `is_staff` alone only opens the admin's door.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from batch.models import BatchJob

VIEW = "batch.view_batchjob"
SUBMIT = "batch.add_batchjob"
CANCEL = "batch.cancel_batchjob"
RESIZE = "batch.resize_batchjob"
PAUSE = "batch.pause_batchjob"
RETRY = "batch.retry_batchjob"

User = AbstractBaseUser | AnonymousUser


def _has(user: User, perm: str) -> bool:
    has_perm = getattr(user, "has_perm", None)  # PermissionsMixin and AnonymousUser have it
    return bool(user.is_authenticated and has_perm is not None and has_perm(perm))


def can_view_all(user: User) -> bool:
    return _has(user, VIEW)


def can_submit(user: User) -> bool:
    if not user.is_authenticated:
        return False
    return not settings.BATCH_SUBMIT_REQUIRES_PERMISSION or _has(user, SUBMIT)


def _owns(user: User, batch: BatchJob) -> bool:
    return bool(user.is_authenticated and batch.created_by_id is not None and batch.created_by_id == user.pk)


def can_cancel(user: User, batch: BatchJob) -> bool:
    return _owns(user, batch) or _has(user, CANCEL)


def can_resize(user: User, batch: BatchJob) -> bool:
    return _owns(user, batch) or _has(user, RESIZE)


def can_pause(user: User, batch: BatchJob) -> bool:
    """Pause and resume."""
    return _owns(user, batch) or _has(user, PAUSE)


def can_retry(user: User, batch: BatchJob) -> bool:
    return _owns(user, batch) or _has(user, RETRY)


def dashboard_permissions(user: User) -> dict[str, bool]:
    """What the dashboard's controls may offer on other users' batches (the API decides anyway)."""
    return {
        "submit": can_submit(user),
        "cancel": _has(user, CANCEL),
        "resize": _has(user, RESIZE),
        "pause": _has(user, PAUSE),
        "retry": _has(user, RETRY),
    }
