"""Signals sent by `batch.services` after a state change has committed.

`batch.events` listens to fan changes out to the dashboard; anything else may listen too.
"""

from __future__ import annotations

from django.dispatch import Signal

# kwargs: batch_id (UUID), item_ids (list[int]; the items whose state changed, may be empty)
batch_changed = Signal()
