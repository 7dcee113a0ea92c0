"""The key=value log formatter configured in settings.LOGGING."""

from __future__ import annotations

import logging
import sys

from batchsite.logformat import KeyValueFormatter


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "batch.test", "levelno": logging.INFO, "levelname": "INFO", "msg": msg})
    rec.__dict__.update(extra)
    return rec


def test_extra_fields_are_appended_as_key_value_pairs() -> None:
    line = KeyValueFormatter("%(levelname)s %(message)s").format(record("batch finished", batch_id="b1", total=3))

    assert line == "INFO batch finished batch_id=b1 total=3"


def test_values_with_spaces_or_quotes_are_quoted() -> None:
    line = KeyValueFormatter("%(message)s").format(record("x", label='a "b" c', empty=""))

    assert line == 'x label="a \\"b\\" c" empty=""'


def test_a_record_without_extras_is_left_as_is_and_tracebacks_follow_the_fields() -> None:
    formatter = KeyValueFormatter("%(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        failing = record("failed", item=7)
        failing.exc_info = sys.exc_info()

    assert formatter.format(record("plain")) == "plain"
    first, _, rest = formatter.format(failing).partition("\n")
    assert first == "failed item=7"
    assert rest.startswith("Traceback") and "ValueError: boom" in rest
