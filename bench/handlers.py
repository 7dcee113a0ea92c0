"""Handlers that model real work, for the `io` and `sleep-io` scenarios.

Workers load them through BATCH_HANDLER_MODULES=bench.handlers (set by `bench.harness`); the
suite imports this module too, since a submit validates items against the registry.
The local service is Redis (BENCH_REDIS_URL, default db 12): a real network round trip to
another process that costs little CPU, as a cache or an API call would. Each round trip is an
INCR of a per-batch counter, so the suite can check that every round trip happened.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import weakref
from typing import Any

import redis.asyncio as aioredis
from rest_framework import serializers

from batch.handlers import batch_handler

REDIS_URL_ENV = "BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"

# One client, hence one connection pool, per process and event loop (never one per item):
# its connections are bound to the loop that opened them.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


def redis_url() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def counter_key(batch_id: uuid.UUID | str) -> str:
    return f"bench:io:{batch_id}"


def shared_client() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = aioredis.Redis.from_url(redis_url())
    return client


class SleepIoParams(serializers.Serializer[Any]):
    seconds = serializers.FloatField(min_value=0, max_value=60, default=0.05)


@batch_handler("bench.io")
async def io(params: dict[str, Any], ctx: Any) -> None:
    """Awaits one round trip to Redis (INCR of the batch's counter)."""
    await shared_client().incr(counter_key(ctx.batch_id))


@batch_handler("bench.sleep_io", params=SleepIoParams)
async def sleep_io(params: dict[str, Any], ctx: Any) -> None:
    """One round trip to Redis, `asyncio.sleep(seconds)`, another round trip."""
    client = shared_client()
    await client.incr(counter_key(ctx.batch_id))
    await asyncio.sleep(params["seconds"])
    await client.incr(counter_key(ctx.batch_id))
