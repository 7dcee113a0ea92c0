"""Progress display for interactive `runbatch` runs: one line per batch, redrawn in place."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TextIO

from batch import selectors
from batch.store import call_db
from batch.worker import Worker

BAR_WIDTH = 24


@dataclass
class _Rate:
    started: float
    finished: int


@dataclass
class ProgressDisplay:
    """A worker observer that draws progress every `interval` seconds.

    On a terminal the lines are redrawn in place; otherwise one line per batch is printed
    per interval, which reads well in logs.
    """

    stream: TextIO
    interval: float = 0.5
    in_place: bool = True
    _last_draw: float = 0.0
    _lines_drawn: int = 0
    _seen: dict[uuid.UUID, _Rate] = field(default_factory=dict)
    _done: set[uuid.UUID] = field(default_factory=set)

    async def __call__(self, worker: Worker, *, final: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_draw < self.interval and not final:
            return
        self._last_draw = now
        ids = set(worker.runners) | (set(self._seen) - self._done)
        if worker.config.only_batch is not None:
            ids.add(worker.config.only_batch)
        if not ids:
            return
        rows = await call_db(selectors.progress_rows, list(ids))
        self._draw([self._line(row, now) for row in rows])

    def _line(self, row: selectors.ProgressRow, now: float) -> str:
        rate = self._seen.setdefault(row.id, _Rate(started=now, finished=row.finished))
        if row.terminal:
            self._done.add(row.id)
        elapsed = max(now - rate.started, 1e-6)
        speed = (row.finished - rate.finished) / elapsed
        remaining = row.total - row.finished
        eta = f"{remaining / speed:5.0f}s" if speed > 0 and remaining else "    -"
        filled = int(BAR_WIDTH * row.finished / row.total) if row.total else BAR_WIDTH
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (
            f"{row.label[:28]:<28} {row.status:<10} [{bar}] {row.finished:>6}/{row.total:<6} "
            f"ok {row.succeeded} failed {row.failed} cancelled {row.cancelled} running {row.running} "
            f"{speed:7.1f} items/s eta {eta}"
        )

    def _draw(self, lines: list[str]) -> None:
        if self.in_place and self._lines_drawn:
            self.stream.write(f"\x1b[{self._lines_drawn}F")
        for line in lines:
            self.stream.write(("\x1b[2K" if self.in_place else "") + line + "\n")
        self._lines_drawn = len(lines)
        self.stream.flush()
