"""Benchmark suite of the batch engine (issue 7): `python -m bench <scenario>...`.

Each scenario starts its own `manage.py runbatch` worker process(es) against the configured
database, measures from the outside (wall clock, /proc, pg_stat_activity) and returns plain
numbers; `bench.report` turns repetitions into medians and min-max, JSON and Markdown.
"""

SCENARIOS = ["noop", "sleep", "cancel", "memory", "connections", "submit", "scale", "scale16", "io", "sleep-io", "cpu"]

NEEDS_REDIS = {"io", "sleep-io"}  # their handlers' local service
SIZABLE = ["cancel", "cpu", "io", "noop", "sleep", "sleep-io"]
"""Scenarios whose size is one item count (cancel: a number of cancels), which `--size NAME=N` sets."""
