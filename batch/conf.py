"""The app's settings and their defaults, for projects that install `batch` as a library.

The engine reads `django.conf.settings.BATCH_*` directly; a host project that leaves one
out gets the default below, installed on the settings object when the app loads
(`BatchConfig.ready`). A value the project sets always wins. `batchsite/settings.py` reads
the same names from the environment with the same defaults (`tests/test_conf.py` holds them
equal).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Parallelism and the worker (`runbatch`).
    "BATCH_GLOBAL_MAX_PARALLEL": 4,
    "BATCH_WORKER_CONCURRENCY": 16,
    "BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS": 30.0,
    "BATCH_MAX_ATTEMPTS": 3,
    "BATCH_LEASE_SECONDS": 30.0,
    "BATCH_HEARTBEAT_SECONDS": 10.0,
    "BATCH_POLL_INTERVAL_SECONDS": 0.5,
    "BATCH_ITEM_TIMEOUT_SECONDS": 0.0,  # 0: no per-item timeout
    "BATCH_MAX_RUNNING_PER_OWNER": 0,  # 0: no limit on one owner's running items cluster-wide
    "BATCH_SYNC_PROCESSES": 0,  # processes for sync handlers per worker; 0: its concurrency
    "BATCH_LOG_SUMMARY_SECONDS": 60.0,  # 0: no `worker summary` log lines
    "BATCH_HANDLER_MODULES": [],  # besides each installed app's `batch_handlers` module
    "BATCH_DEMO_HANDLERS": False,  # the built-in demo.* handlers (any user could hold workers)
    # Prometheus metrics (batch/metrics.py).
    "BATCH_METRICS_ENABLED": True,  # False: the engine's metric hooks do nothing
    "BATCH_METRICS_PORT": 0,  # `runbatch` serves its metrics on this port; 0: off
    "BATCH_METRICS_ADDR": "0.0.0.0",  # the address that server binds
    "BATCH_METRICS_TOKEN": "",  # `Authorization: Bearer <token>` may read /metrics; "": staff sessions only
    # Input limits and throttles (API, admin, `submitbatch`).
    "BATCH_MAX_ITEMS_PER_BATCH": 100_000,
    "BATCH_MAX_ITEM_PARAMS_BYTES": 64 * 1024,
    "BATCH_MAX_ITEM_PARAMS_DEPTH": 20,
    "BATCH_SUBMIT_THROTTLE_RATE": "120/min",  # "": no throttle
    "BATCH_CANCEL_THROTTLE_RATE": "120/min",
    "BATCH_RESIZE_THROTTLE_RATE": "120/min",
    "BATCH_WS_RECHECK_SECONDS": 2.0,  # dashboard sockets re-check session and permission
    "BATCH_MAX_CONCURRENT_SUBMITS_PER_USER": 2,  # per process; 0: unbounded
    "BATCH_MAX_WAITING_CANCELS_PER_USER": 4,
    "BATCH_MAX_CONCURRENT_EXPORTS_PER_USER": 4,  # streaming at once, per process
    "BATCH_SUBMIT_REQUIRES_PERMISSION": False,
    # Completion webhooks (batch/services/callbacks.py, batch/callbacks_delivery.py).
    "BATCH_CALLBACK_ALLOWED_HOSTS": [],  # "host" (any port) or "host:port"; empty: no callback_url is accepted
    "BATCH_CALLBACK_SECRET": "",  # HMAC-SHA256 key of X-Batch-Signature
    "BATCH_CALLBACK_RETRY_SECONDS": 3600.0,  # failed deliveries are retried this long after the batch ended
    "BATCH_CALLBACK_BACKOFF_SECONDS": 5.0,  # first retry delay; doubles per attempt (jittered), at most 10 min
}


def install_defaults() -> list[str]:
    """Set every setting in DEFAULTS that the project did not define; return their names."""
    missing = [name for name in DEFAULTS if not hasattr(settings, name)]
    for name in missing:
        value = DEFAULTS[name]
        setattr(settings, name, list(value) if isinstance(value, list) else value)
    return missing
