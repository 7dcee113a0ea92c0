"""Signals sent by `batch.services` after a state change has committed.

`batch.events` listens to fan changes out to the dashboard; anything else may listen too.
"""

from __future__ import annotations

from django.dispatch import Signal

# kwargs: batch_id (UUID), item_ids (list[int]; the items whose state changed, may be empty)
batch_changed = Signal()

# kwargs: batch_id (UUID), status (str: succeeded, failed or cancelled). Sent once per batch,
# after the transaction that moved it to its terminal status commits (send_robust), in the
# process that made that change: for in-process hooks. Remote ones: the batch's callback_url.
batch_finished = Signal()
