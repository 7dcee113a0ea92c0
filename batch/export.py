"""Result export: every item of a batch as JSON Lines or CSV, streamed in index order.

Rows come in chunks by keyset pagination on `index` (`selectors.export_chunk`): memory is one
chunk, and between chunks no transaction is open and no connection held (it goes back to the
pool, or is closed). `streaming_response` hands Django an async iterator under ASGI — a sync one
there would be read to the end before the first byte is sent — and a sync one under WSGI.
CSV columns are fixed before the first row from the keys the database finds (`selectors.json_keys`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.http import HttpRequest, StreamingHttpResponse

from batch import selectors
from batch.models import BatchJob

CONTENT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
MAX_KEY_COLUMNS = 100  # per JSON field (params, result); the rest goes to its overflow column
MAX_KEY_LENGTH = 200  # a longer key gets no column of its own either
FIRST_CHUNK_ROWS, MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 100, 10, 5000  # rows; items reach 64 KiB of params
CHUNK_BYTES = 1 << 20  # later chunks aim at about this much output: big items, fewer rows
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: what spreadsheets read as a formula
_SURROGATES = re.compile("[\ud800-\udfff]")
# Built once: json.dumps with options builds an encoder per call, a third of the CSV's time.
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_strict = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_ascii = json.JSONEncoder(separators=(",", ":")).encode

NO_KEYS = selectors.JsonKeys(keys=(), overflow=False)
Row = Sequence[Any]  # selectors.EXPORT_FIELDS: index, source_index, status, attempts, params, result, error


@dataclass(frozen=True)
class Layout:
    """What one export writes: the format, whether the batch is a retry (`source_index`), and for
    CSV the key columns of `params` and `result` (fixed before the first row)."""

    fmt: str
    with_source_index: bool
    params: selectors.JsonKeys = NO_KEYS  # JSON Lines needs no columns
    result: selectors.JsonKeys = NO_KEYS

    def header(self) -> list[str]:
        columns = ["index", *(["source_index"] if self.with_source_index else []), "status", "attempts"]
        for name, keys in (("params", self.params), ("result", self.result)):
            columns += [f"{name}.{key}" for key in keys.keys] + ([name] if keys.overflow else [])
        return [*columns, "error"]

    def head(self) -> bytes:
        return _csv_text([self.header()]) if self.fmt == "csv" else b""

    def encode(self, rows: Sequence[Row]) -> bytes:
        if self.fmt == "jsonl":
            return b"".join(_jsonl_line(row, with_source_index=self.with_source_index) for row in rows)
        return _csv_text([self._cells(row) for row in rows])

    def _cells(self, row: Row) -> list[Any]:
        index, source_index, status, attempts, params, result, error = row
        cells: list[Any] = [index, *([source_index] if self.with_source_index else []), status, attempts]
        return [*cells, *_flattened(params, self.params), *_flattened(result, self.result), _cell(error)]


def plan(batch: BatchJob, fmt: str) -> Layout:
    """The layout of `batch`'s export; for CSV this reads the key columns (one scan per field)."""
    with_source_index = batch.retry_of_id is not None
    if fmt == "jsonl":
        return Layout(fmt, with_source_index)
    params, result = (
        selectors.json_keys(batch.pk, field, limit=MAX_KEY_COLUMNS, max_length=MAX_KEY_LENGTH)
        for field in ("params", "result")
    )
    return Layout(fmt, with_source_index, params, result)


def streaming_response(
    request: HttpRequest, batch: BatchJob, fmt: str, *, on_close: Callable[[], None] | None = None
) -> StreamingHttpResponse:
    """The export of `batch` as an attachment, streamed (async under ASGI, sync under WSGI).
    A HEAD gets the headers only: nothing is read (an ASGI server would read the whole body to
    drop it). `on_close` runs once, when the response is closed (or garbage-collected)."""
    is_async = isinstance(request, ASGIRequest)
    content: Iterator[bytes] | AsyncIterator[bytes]
    if request.method == "HEAD":
        content = _nothing() if is_async else iter(())
    else:
        layout = plan(batch, fmt)
        content = _async_stream(batch, layout) if is_async else _sync_stream(batch, layout)
    body: Any = content
    if on_close is not None:
        body = _AsyncBody(content, on_close) if isinstance(content, AsyncIterator) else _SyncBody(content, on_close)
    response = StreamingHttpResponse(body, content_type=CONTENT_TYPES[fmt])
    response["Content-Disposition"] = f'attachment; filename="batch-{batch.pk}.{fmt}"'
    response["Cache-Control"] = "no-store"
    return response


def stream(batch: BatchJob, fmt: str) -> Iterator[bytes]:
    """The export of `batch` as chunks of bytes, read as they are needed (`manage.py exportbatch`)."""
    return _sync_stream(batch, plan(batch, fmt))


# --- streaming -----------------------------------------------------------------------------


class _Body:
    """Content with a `close()` that runs `on_close` once: Django calls it when the response ends
    (after the last byte, or a disconnect); garbage collection of the response is the fallback.
    The response iterates the body itself (not its content), so the body lives as long as it."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        self.close = weakref.finalize(self, on_close)


class _SyncBody(_Body):
    def __init__(self, content: Iterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(on_close)
        self.content = content

    def __iter__(self) -> _SyncBody:
        return self

    def __next__(self) -> bytes:
        return next(self.content)


class _AsyncBody(_Body):  # no __iter__: Django tells async content by iter() failing
    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(on_close)
        self.content = content

    def __aiter__(self) -> _AsyncBody:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self.content)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing


class _Chunks:
    """Reads and encodes the next chunk after the last index sent; sizes chunks by output bytes."""

    def __init__(self, batch: BatchJob, layout: Layout) -> None:
        self.batch_id, self.layout = batch.pk, layout
        self.after, self.rows, self.done = -1, FIRST_CHUNK_ROWS, False

    def next(self) -> bytes:
        try:
            rows = selectors.export_chunk(self.batch_id, after=self.after, limit=self.rows)
            data = self.layout.encode(rows)
        finally:
            if not connection.in_atomic_block:  # a test's transaction: nothing waits on it then
                connection.close()  # back to the pool (or closed) between chunks
        self.done = len(rows) < self.rows
        if rows:
            self.after = rows[-1][0]
            per_row = max(1, len(data) // len(rows))
            self.rows = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // per_row))
        return data


def _sync_stream(batch: BatchJob, layout: Layout) -> Iterator[bytes]:
    if head := layout.head():
        yield head
    chunks = _Chunks(batch, layout)
    while not chunks.done:
        if data := chunks.next():
            yield data


async def _async_stream(batch: BatchJob, layout: Layout) -> AsyncIterator[bytes]:
    if head := layout.head():
        yield head
    chunks = _Chunks(batch, layout)
    read: Callable[[], Any] = sync_to_async(chunks.next)  # the request's thread: its connection
    while not chunks.done:
        if data := await read():
            yield data


# --- encoding ------------------------------------------------------------------------------


def _jsonl_line(row: Row, *, with_source_index: bool) -> bytes:
    index, source_index, status, attempts, params, result, error = row
    record: dict[str, Any] = {"index": index}
    if with_source_index:
        record["source_index"] = source_index
    record.update(status=status, attempts=attempts, params=params, result=result, error=error)
    try:
        line = _strict(record)
    except ValueError:  # NaN or infinity (SQLite keeps them): not JSON, written as null
        line = _compact(_finite(record))
    try:
        return line.encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (SQLite keeps them): escaped, still valid JSON
        return _ascii(_finite(record)).encode() + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _flattened(value: Any, keys: selectors.JsonKeys) -> list[str]:
    """A JSON field as its key columns plus, with `overflow`, the rest: a non-object value, or
    an object of the keys without a column. Keys that appeared after the header was read (a
    batch still running) have no column and are left out unless there is an overflow column."""
    if not isinstance(value, dict):
        rest = "" if value is None else _cell(value)
        return [""] * len(keys.keys) + ([rest] if keys.overflow else [])
    cells = [_cell(value.get(key)) for key in keys.keys]
    if keys.overflow:
        known = set(keys.keys)
        others = {key: item for key, item in value.items() if key not in known}
        cells.append(_cell(others) if others else "")
    return cells


def _cell(value: Any) -> str:
    """One CSV cell: strings as they are, guarded against formula injection; deeper values as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_STARTS) else value
    if type(value) is int:  # not bool
        return str(value)
    return _compact(value)  # true, -1.5, NaN, {...}, [...]


def _csv_text(rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)  # RFC 4180: quotes, CRLF
    text = buffer.getvalue()
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (SQLite keeps them): not text, replaced
        return _SURROGATES.sub("\ufffd", text).encode()
