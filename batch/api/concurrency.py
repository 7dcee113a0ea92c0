"""Per-user bounds on requests that are expensive while they last (submits, waiting cancels, exports).

A throttle counts requests per minute; this counts those in progress, in this process: the
request past the bound answers 429 with `Retry-After`, having done nothing.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from rest_framework.exceptions import Throttled


class UserSlots:
    """At most `limit` requests of one user inside `hold()` at once (0: unbounded)."""

    def __init__(self, what: str) -> None:
        self.what = what
        # Re-entrant: an export's slot may be released by garbage collection, on any thread, at any point.
        self._lock = threading.RLock()
        self._held: Counter[Any] = Counter()

    @contextlib.contextmanager
    def hold(self, user: Any, *, limit: int, retry_after: float = 1.0) -> Iterator[None]:
        key = getattr(user, "pk", None)
        with self._lock:
            if limit and self._held[key] >= limit:
                raise Throttled(
                    wait=max(1, math.ceil(retry_after)),
                    detail=f"At most {limit} {self.what} of one user at once; retry when one has finished.",
                )
            self._held[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[key] -= 1
                if self._held[key] <= 0:
                    self._held.pop(key, None)

    def take(self, user: Any, *, limit: int, retry_after: float = 1.0) -> Callable[[], None]:
        """Hold a slot past this call (a streamed response's lifetime); returns its release (idempotent)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.hold(user, limit=limit, retry_after=retry_after))
        return stack.close

    def held(self, user: Any) -> int:
        with self._lock:
            return self._held.get(getattr(user, "pk", None), 0)


submits = UserSlots("submissions")
cancel_waits = UserSlots("waiting cancels")
pause_waits = UserSlots("waiting pauses")
exports = UserSlots("exports")
