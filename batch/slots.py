"""Slots in one worker process: a batch's permits (`Limiter`) and the worker's concurrency
shared fairly among batches and their owners (`WorkerSlots`)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Hashable
from typing import Any


async def _first(awaitable: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Wait for `awaitable` or `stop`; True if `awaitable` completed."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({awaitable, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    return awaitable.done() and not awaitable.cancelled()


class Limiter:
    """A semaphore whose capacity can change while it is held: at most `capacity` holders;
    shrinking never interrupts a holder, it only makes the next ones wait."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def free(self) -> int:
        return max(self.capacity - self.in_use, 0)

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Take a slot; False (nothing taken) if `stop` is set first (then call `interrupt`)."""
        while self.in_use >= self.capacity and not stop.is_set():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
        if stop.is_set():
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1
        self.interrupt()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self.interrupt()

    def interrupt(self) -> None:
        """Wake every waiter to look again (at the capacity, or at its stop event)."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class WorkerSlots:
    """The worker's concurrency. A slot that frees goes to the waiting batch whose owner runs
    the fewest items here (ties: the longest waiting), so one owner's batches cannot keep a
    newcomer's waiting behind them, and batches of one owner take turns."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running: Counter[Hashable] = Counter()
        self._waiters: dict[int, tuple[Hashable, asyncio.Future[None]]] = {}
        self._order = itertools.count()

    @property
    def in_use(self) -> int:
        return sum(self.running.values())

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, owner: Hashable, stop: asyncio.Event) -> bool:
        """Take a slot for `owner`; False (nothing taken) if `stop` is set first."""
        if self.in_use < self.capacity and not self._waiters:
            self.running[owner] += 1
            return True
        key = next(self._order)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key] = (owner, granted)
        try:
            if await _first(granted, stop):
                return True
        except BaseException:
            self._withdraw(key, owner, granted)
            raise
        self._withdraw(key, owner, granted)
        return False

    def _withdraw(self, key: int, owner: Hashable, granted: asyncio.Future[None]) -> None:
        self._waiters.pop(key, None)
        if granted.done() and not granted.cancelled():
            self.release(owner)  # granted as we stopped: pass it on
        else:
            granted.cancel()

    def release(self, owner: Hashable) -> None:
        self.running[owner] -= 1
        if self.running[owner] <= 0:
            del self.running[owner]
        self._grant()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.in_use < self.capacity:
            key = min(self._waiters, key=lambda k: (self.running[self._waiters[k][0]], k))
            owner, granted = self._waiters.pop(key)
            self.running[owner] += 1
            granted.set_result(None)
