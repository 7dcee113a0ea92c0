"""Handler registry, the context a handler receives, and the built-in handlers.

A handler is registered with `@batch_handler(name, params=SomeSerializer)`. Its parameters
are validated per item at submit time; at run time it receives the validated dict and an
`ItemContext`. Async handlers run on the worker's loop, sync ones off it (in killable worker
processes, `batch.processes`). Apps add handlers in a `batch_handlers` module, found by `autodiscover()`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections
from django.utils.module_loading import autodiscover_modules
from rest_framework import serializers

from batch.forecasting import backtest
from batch.processes import HandlerError

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event as ProcessEvent

logger = logging.getLogger(__name__)

HandlerFunc = Callable[[dict[str, Any], "ItemContext"], Any]


class UnknownHandler(LookupError):
    pass


class ItemCancelled(Exception):
    """Raised inside a handler (by `ctx.raise_if_cancelled()`) to stop at a checkpoint."""


@dataclass
class ItemContext:
    """What a handler knows about the item it runs and the batch it belongs to.

    `cancel_event` is the batch's `asyncio.Event` on the loop, or a `threading`/`multiprocessing`
    Event where a sync handler runs in a worker process. Async handlers `await ctx.sleep(s)`,
    sync ones call `ctx.wait(s)`; both wake and raise `ItemCancelled` once the batch is cancelled.
    """

    batch_id: uuid.UUID
    item_id: int
    index: int
    attempt: int
    cancel_event: asyncio.Event | threading.Event | ProcessEvent
    progress_fraction: float = 0.0
    progress_message: str = ""
    _on_progress: Callable[[ItemContext], None] | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise ItemCancelled()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake and raise `ItemCancelled` as soon as the batch is cancelled."""
        event = self.cancel_event
        if not isinstance(event, asyncio.Event):
            raise TypeError("ctx.sleep() is for async handlers; a sync handler calls ctx.wait(seconds)")
        try:
            await asyncio.wait_for(event.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise ItemCancelled()

    def wait(self, seconds: float) -> None:
        """`sleep` for sync handlers: block, but wake and raise `ItemCancelled` on cancel."""
        event = self.cancel_event
        if not isinstance(event, asyncio.Event):
            if event.wait(seconds):
                raise ItemCancelled()
            return
        # A loop's Event cannot be waited on from another thread: look at it often instead.
        deadline = time.monotonic() + seconds
        while not event.is_set() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        self.raise_if_cancelled()

    def progress(self, fraction: float, message: str = "") -> None:
        self.progress_fraction = min(max(fraction, 0.0), 1.0)
        self.progress_message = message
        if self._on_progress is not None:
            self._on_progress(self)


@dataclass(frozen=True)
class Retry:
    """A handler's retry policy: a failed attempt whose exception is one of `on` is tried again
    (up to `attempts` in all, unless the batch sets its own `max_attempts`) after a backoff with
    full jitter: a random delay between 0 and `min(max_delay, backoff * 2 ** (attempt - 1))`
    seconds. The item timeout counts as a `TimeoutError`; a cancellation is never retried."""

    attempts: int = 3
    backoff: float = 2.0
    max_delay: float = 60.0
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry(attempts=...) must be at least 1")
        if self.backoff < 0 or self.max_delay < 0:
            raise ValueError("Retry backoff and max_delay must not be negative")
        if not self.on or not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in self.on):
            raise ValueError("Retry(on=...) must be a non-empty tuple of exception classes")

    def applies_to(self, error: BaseException) -> bool:
        if isinstance(error, ItemCancelled):
            return False
        # A sync handler's exception that could not be rebuilt in the worker: by its class names.
        return isinstance(error, self.on) or (isinstance(error, HandlerError) and error.was_a(self.on))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first)."""
        ceiling = min(self.max_delay, self.backoff * 2 ** min(attempt - 1, 62))
        return random.uniform(0, ceiling)


_validators = threading.local()


@dataclass(frozen=True)
class HandlerSpec:
    name: str
    func: HandlerFunc
    params: type[serializers.Serializer[Any]] | None
    is_async: bool
    description: str
    # Sync handlers: "process" (killable worker processes, every core) or "thread" (for code
    # that cannot leave the worker process; a thread cannot be stopped by force).
    isolation: str = "process"
    retry: Retry | None = None  # None: a failed attempt is final

    def validate(self, params: object) -> dict[str, Any]:
        """Validated params of one item, or `serializers.ValidationError` with the field errors."""
        if not isinstance(params, Mapping):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        if self.params is None:
            return dict(params)
        return dict(self._validator().run_validation(params))

    def _validator(self) -> serializers.Serializer[Any]:
        """One serializer per handler and thread, reused for every item (as DRF's
        `many=True` reuses its child): building its fields per item was most of a submit."""
        cache: dict[str, serializers.Serializer[Any]] = _validators.__dict__.setdefault("by_name", {})
        validator = cache.get(self.name)
        if validator is None or type(validator) is not self.params:
            assert self.params is not None
            validator = cache[self.name] = self.params()
        return validator

    def call(self, params: dict[str, Any], ctx: ItemContext) -> Awaitable[Any] | Any:
        return self.func(params, ctx)

    def call_sync(self, params: dict[str, Any], ctx: ItemContext) -> Any:
        """Run a sync handler on a pool thread; give back any connection it opened, so the
        connections the worker holds stay bounded by the pool, not by the item count."""
        try:
            return self.func(params, ctx)
        finally:
            close_old_connections_of_thread()


def close_old_connections_of_thread() -> None:
    for conn in connections.all(initialized_only=True):
        conn.close()


_registry: dict[str, HandlerSpec] = {}


def batch_handler(
    name: str,
    *,
    params: type[serializers.Serializer[Any]] | None = None,
    isolation: str = "process",
    retry: Retry | None = None,
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Register `func` as the handler called `name`; a sync one runs in a worker process that
    can be killed (`isolation="process"`) or, if it cannot leave the worker, in a thread.
    `retry` tries failed attempts again (see `Retry`)."""
    if isolation not in ("process", "thread"):
        raise ValueError(f"isolation must be 'process' or 'thread', not {isolation!r}")

    def register(func: HandlerFunc) -> HandlerFunc:
        existing = _registry.get(name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"batch handler {name!r} is already registered by {existing.func!r}")
        _registry[name] = HandlerSpec(
            name=name,
            func=func,
            params=params,
            is_async=inspect.iscoroutinefunction(func),
            description=inspect.getdoc(func) or "",
            isolation=isolation,
            retry=retry,
        )
        return func

    return register


def get_handler(name: str) -> HandlerSpec:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownHandler(name) from None


def registered_handlers() -> dict[str, HandlerSpec]:
    return dict(sorted(_registry.items()))


def autodiscover() -> None:
    """Import `batch_handlers` of every installed app and each of BATCH_HANDLER_MODULES; the
    built-in demo handlers stay registered only with BATCH_DEMO_HANDLERS (any user could occupy
    workers with `demo.sleep`: an hour per item, uncancellable)."""
    if not settings.BATCH_DEMO_HANDLERS:
        for name in DEMO_HANDLERS:
            _registry.pop(name, None)
    autodiscover_modules("batch_handlers")
    for module in settings.BATCH_HANDLER_MODULES:
        import_module(module)


# --- built-in handlers ----------------------------------------------------------------------

DEMO_HANDLERS = ("demo.noop", "demo.sleep", "demo.forecast")


class SleepParams(serializers.Serializer[Any]):
    # Declared in get_fields(): a class attribute named `fail` would shadow Field.fail().
    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {
            "seconds": serializers.FloatField(min_value=0, max_value=3600),
            "fail": serializers.BooleanField(default=False),
            "cooperative": serializers.BooleanField(default=True),
        }


class ForecastParams(serializers.Serializer[Any]):
    store = serializers.CharField(max_length=100)
    product = serializers.CharField(max_length=100)
    horizon = serializers.IntegerField(min_value=1, max_value=365, default=28)


@batch_handler("demo.noop")
async def noop(params: dict[str, Any], ctx: ItemContext) -> None:
    """Does nothing and returns at once: measures the engine's own overhead."""


@batch_handler("demo.sleep", params=SleepParams)
async def sleep(params: dict[str, Any], ctx: ItemContext) -> dict[str, float]:
    """Sleeps `seconds`; stops early on cancel unless `cooperative` is false; `fail` raises."""
    if params["cooperative"]:
        await ctx.sleep(params["seconds"])
    else:
        await asyncio.sleep(params["seconds"])
    if params["fail"]:
        raise RuntimeError("demo.sleep was asked to fail")
    return {"slept": params["seconds"]}


@batch_handler("demo.forecast", params=ForecastParams)
def forecast(params: dict[str, Any], ctx: ItemContext) -> dict[str, object]:
    """Backtests seasonal-naive against a moving average on a synthetic sales series."""
    ctx.raise_if_cancelled()
    return backtest(params["store"], params["product"], params["horizon"])
