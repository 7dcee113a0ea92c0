"""A logging formatter that appends a record's `extra=` fields as `key=value` pairs.

`logger.info("batch finished", extra={"batch_id": …, "status": "succeeded"})` prints
`2026-01-01 12:00:00,000 INFO batch.services batch finished batch_id=… status=succeeded`:
one line per event, greppable, and parseable by logfmt-aware log shippers.
"""

from __future__ import annotations

import json
import logging

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(ch in text for ch in ' ="\n'):
        return text
    return json.dumps(text)


class KeyValueFormatter(logging.Formatter):
    """The usual format, then ` key=value` for each extra field (quoted when needed)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{key}={_value(value)}" for key, value in record.__dict__.items() if key not in _STANDARD]
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {' '.join(extras)}{sep}{tail}"
