"""Sync handlers that tests/test_processes.py runs in worker processes (module level, importable)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from batch.handlers import ItemContext, batch_handler

GATE_LIMIT = 30.0  # seconds a gate waits before it gives up (a hang fails, never stalls)


def _until(predicate: Any, what: str) -> None:
    give_up = time.monotonic() + GATE_LIMIT
    while not predicate():
        if time.monotonic() > give_up:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.005)


@batch_handler("test.proc.echo")
def echo(params: dict[str, Any], ctx: ItemContext) -> dict[str, Any]:
    return {
        "params": params,
        "pid": os.getpid(),
        "ctx": [ctx.batch_id, ctx.item_id, ctx.index, ctx.attempt, ctx.cancelled],
    }


@batch_handler("test.proc.database")
def database(params: dict[str, Any], ctx: ItemContext) -> dict[str, Any]:
    from django.contrib.auth.models import User
    from django.db import connections

    was_open = connections["default"].connection is not None
    return {
        "name": str(connections["default"].settings_dict["NAME"]),
        "user_exists": User.objects.filter(username=params["username"]).exists(),
        "connection_open_before": was_open,
        "pid": os.getpid(),
    }


@batch_handler("test.proc.heartbeat")
def heartbeat(params: dict[str, Any], ctx: ItemContext) -> None:
    """Ignores cancellation: bumps a counter in a file for ever."""
    path = Path(params["path"])
    path.write_text("0")  # before it reports: a test that reads the file after a kill finds one
    ctx.progress(0.0, str(os.getpid()))
    beat = 0
    while True:
        beat += 1
        path.write_text(str(beat))
        time.sleep(0.001)


@batch_handler("test.proc.until_cancelled")
def until_cancelled(params: dict[str, Any], ctx: ItemContext) -> str:
    ctx.progress(0.5, "spinning")
    while not ctx.cancelled:
        pass
    return "saw cancel"


@batch_handler("test.proc.wait")
def wait(params: dict[str, Any], ctx: ItemContext) -> str:
    ctx.progress(0.25, "waiting")
    ctx.wait(params["seconds"])
    return "waited"


@batch_handler("test.proc.gate")
def gate(params: dict[str, Any], ctx: ItemContext) -> int:
    """Reports its start, then holds its process until `release` exists."""
    ctx.progress(0.0, "holding")
    release = Path(params["release"])
    _until(release.exists, "the release file")
    return os.getpid()


@batch_handler("test.proc.rendezvous")
def rendezvous(params: dict[str, Any], ctx: ItemContext) -> int:
    """A cross-process barrier: returns only once `parties` handlers have arrived."""
    folder = Path(params["folder"])
    (folder / str(os.getpid())).touch()
    _until(lambda: len(list(folder.iterdir())) >= params["parties"], "the other handlers")
    return os.getpid()


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")  # pickles, but cannot be rebuilt from its args


@batch_handler("test.proc.fail")
def fail(params: dict[str, Any], ctx: ItemContext) -> None:
    kind = params["kind"]
    if kind == "value":
        raise ValueError("bad value 42")
    if kind == "timeout":
        raise TimeoutError("the handler's own timeout")
    if kind == "cancelled":
        ctx.raise_if_cancelled()
        from batch.handlers import ItemCancelled

        raise ItemCancelled()
    if kind == "unpicklable_error":
        raise NeedsTwoArguments(7, "odd")
    if kind == "unpicklable_result":
        return lambda: None  # type: ignore[return-value]
    if kind == "exit":
        os._exit(params["code"])
    raise AssertionError(kind)


@batch_handler("test.proc.noop")
def noop(params: dict[str, Any], ctx: ItemContext) -> None:
    """Does nothing: what the pool itself costs per item."""


@batch_handler("test.proc.beats")
def beats(params: dict[str, Any], ctx: ItemContext) -> None:
    """Ignores cancellation for `seconds` (default: for ever): appends `pid time` to the file
    named `dir`/<index> about every millisecond, the way CPU-bound code without checkpoints runs."""
    path = Path(params["dir"]) / str(ctx.index)
    until = time.monotonic() + params.get("seconds", 3600)
    with path.open("a") as out:
        while time.monotonic() < until:
            out.write(f"{os.getpid()} {time.time():.6f}\n")
            out.flush()
            time.sleep(0.001)
