"""Result export: `GET /api/batches/{id}/export/?as=jsonl|csv` and the admin's "Download results".

Exact bodies (order, flattening, escaping, the formula guard), problems, permissions, the ASGI
path (an async iterator that reads one chunk at a time) and, marked slow, the memory of a
100,000-item export.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import AsyncClient, Client

from batch import export, selectors, services
from batch.models import BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.services import Outcome
from tests.conftest import grant
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


def run_all(batch: BatchJob, outcome: Callable[[int], tuple[str, Any, str]]) -> BatchJob:
    """Run every item through the services: outcome(index) -> (status, result, error)."""
    while claimed := services.claim_items(batch_id=batch.pk, worker_id="w", limit=4, lease_seconds=30):
        outcomes = [Outcome(item.id, ItemStatus(outcome(item.index)[0]), *outcome(item.index)[1:]) for item in claimed]
        services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=outcomes)
    return BatchJob.objects.get(pk=batch.pk)


def body(response: Any) -> bytes:
    assert response.status_code == 200, response
    return b"".join(response.streaming_content)


def get_export(client: Any, batch: BatchJob, fmt: str | None = None, **extra: Any) -> Any:
    query = f"?as={fmt}" if fmt else ""
    return client.get(f"/api/batches/{batch.pk}/export/{query}", **extra)


@pytest.fixture
def finished(submit: Callable[..., BatchJob], user: Any) -> BatchJob:
    """Four items: 0 and 1 succeeded (object results), 2 failed, 3 succeeded with a list result."""
    items = [{"store": "S1", "qty": 3}, {"store": "=cmd|' /C calc'!A0", "tags": ["a", "b"]}, {"qty": -2}, {}]
    batch = submit("demo.noop", items, created_by=user, max_parallel=4)
    results = {
        0: ("succeeded", {"mape": 0.25, "ok": True}, ""),
        1: ("succeeded", {"mape": None, "note": 'line1\nline2, "quoted"', "deep": {"x": [1, 2]}}, ""),
        2: ("failed", None, "ValueError: -bad input"),
        3: ("succeeded", [1, 2], ""),
    }
    done = run_all(batch, results.__getitem__)
    assert done.status == BatchStatus.FAILED
    return done


def test_jsonl_has_every_item_in_index_order_as_one_object_a_line(api_client: Any, finished: BatchJob) -> None:
    response = get_export(api_client, finished)
    assert response["Content-Type"] == "application/x-ndjson"
    assert response["Content-Disposition"] == f'attachment; filename="batch-{finished.pk}.jsonl"'
    lines = body(response).decode().split("\n")
    assert lines[-1] == ""  # every line ends with a newline
    assert [json.loads(line) for line in lines[:-1]] == [
        {
            "index": 0,
            "status": "succeeded",
            "attempts": 1,
            "params": {"store": "S1", "qty": 3},
            "result": {"mape": 0.25, "ok": True},
            "error": "",
        },
        {
            "index": 1,
            "status": "succeeded",
            "attempts": 1,
            "params": {"store": "=cmd|' /C calc'!A0", "tags": ["a", "b"]},
            "result": {"mape": None, "note": 'line1\nline2, "quoted"', "deep": {"x": [1, 2]}},
            "error": "",
        },
        {
            "index": 2,
            "status": "failed",
            "attempts": 1,
            "params": {"qty": -2},
            "result": None,
            "error": "ValueError: -bad input",
        },
        {"index": 3, "status": "succeeded", "attempts": 1, "params": {}, "result": [1, 2], "error": ""},
    ]
    assert list(json.loads(lines[0])) == ["index", "status", "attempts", "params", "result", "error"]


def test_csv_flattens_params_and_result_one_level_and_guards_formulas(api_client: Any, finished: BatchJob) -> None:
    response = get_export(api_client, finished, "csv")
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="batch-{finished.pk}.csv"'
    assert body(response).decode() == (
        "index,status,attempts,params.qty,params.store,params.tags,result.deep,result.mape,result.note,result.ok,"
        "result,error\r\n"
        "0,succeeded,1,3,S1,,,0.25,,true,,\r\n"
        '1,succeeded,1,,\'=cmd|\' /C calc\'!A0,"[""a"",""b""]","{""x"":[1,2]}",,"line1\nline2, ""quoted""",,,\r\n'
        "2,failed,1,-2,,,,,,,,ValueError: -bad input\r\n"  # -2 is a number we wrote, not a formula
        '3,succeeded,1,,,,,,,,"[1,2]",\r\n'  # a non-object result: in the `result` column
    )


def test_csv_quotes_odd_keys_and_guards_every_formula_start(api_client: Any, submit: Any, user: Any) -> None:
    odd = 'a,"b"\nc'
    values = ["=1+1", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "'already", "plain"]
    batch = submit("demo.noop", [{odd: v, "n": -1} for v in values], created_by=user)
    rows = list(csv.reader(io.StringIO(body(get_export(api_client, batch, "csv")).decode(), newline="")))
    assert rows[0] == ["index", "status", "attempts", f"params.{odd}", "params.n", "error"]  # code-point order
    assert [row[3:5] for row in rows[1:]] == [
        ["'=1+1", "-1"],
        ["'+1", "-1"],
        ["'-x", "-1"],
        ["'@SUM(A1)", "-1"],
        ["'\tx", "-1"],
        ["'\rx", "-1"],
        ["'already", "-1"],
        ["plain", "-1"],
    ]


def test_csv_columns_are_bounded_and_the_rest_goes_to_the_overflow_column(
    api_client: Any, submit: Any, user: Any
) -> None:
    many = {f"k{i:03d}": i for i in range(export.MAX_KEY_COLUMNS + 2)}  # k000 .. k101
    huge = "h" * (export.MAX_KEY_LENGTH + 1)
    batch = submit("demo.noop", [many, {huge: 1, "k000": 0}], created_by=user)
    rows = list(csv.reader(io.StringIO(body(get_export(api_client, batch, "csv")).decode(), newline="")))
    header = rows[0]
    assert header[3 : 3 + export.MAX_KEY_COLUMNS] == [f"params.k{i:03d}" for i in range(export.MAX_KEY_COLUMNS)]
    assert header[3 + export.MAX_KEY_COLUMNS :] == ["params", "error"]  # no result keys, no result column
    assert json.loads(rows[1][-2]) == {"k100": 100, "k101": 101}
    assert (rows[2][3], json.loads(rows[2][-2])) == ("0", {huge: 1})
    assert max(len(cell) for cell in header) <= len("params.") + export.MAX_KEY_LENGTH


def test_a_retry_batch_exports_source_index(api_client: Any, submit: Any, finished: BatchJob, user: Any) -> None:
    # Arranged by hand as `services.retry_batch` would leave it (its INSERT ... SELECT misses the
    # new `errors` column at this commit): one item, the original's index 2.
    retry = submit("demo.noop", [{"qty": -2}], created_by=user)
    BatchJob.objects.filter(pk=retry.pk).update(retry_of=finished)
    BatchJobItem.objects.filter(batch_id=retry.pk).update(source_index=2)
    retry.refresh_from_db()
    lines = body(get_export(api_client, retry)).decode().splitlines()
    assert [(r["index"], r["source_index"], r["params"]) for r in map(json.loads, lines)] == [(0, 2, {"qty": -2})]
    assert list(json.loads(lines[0]))[:2] == ["index", "source_index"]
    rows = list(csv.reader(io.StringIO(body(get_export(api_client, retry, "csv")).decode(), newline="")))
    assert rows == [
        ["index", "source_index", "status", "attempts", "params.qty", "error"],
        ["0", "2", "pending", "0", "-2", ""],
    ]
    assert b"source_index" not in body(get_export(api_client, finished))  # not a retry: no such field


def test_an_empty_result_set_still_has_a_csv_header(api_client: Any, submit: Any, user: Any) -> None:
    batch = submit("demo.noop", [{}], created_by=user)
    assert body(get_export(api_client, batch, "csv")) == b"index,status,attempts,error\r\n0,pending,0,\r\n"


def test_a_bad_format_is_a_400_problem_naming_the_field(api_client: Any, finished: BatchJob) -> None:
    problem = assert_problem(get_export(api_client, finished, "xlsx"), 400)
    assert list(problem["errors"]) == ["as"]
    assert body(api_client.get(f"/api/batches/{finished.pk}/export/?as=")).count(b"\n") == 4  # empty: the default


def test_unknown_and_invisible_batches_are_404_and_anonymous_401(
    client_for: Any, make_user: Any, finished: BatchJob
) -> None:
    stranger = client_for(make_user("mallory"))
    assert_problem(stranger.get(f"/api/batches/{uuid.uuid4()}/export/"), 404)
    assert_problem(get_export(stranger, finished), 404)
    assert_problem(get_export(stranger, finished, "csv"), 404)
    assert_problem(get_export(client_for(None), finished), 401)


def test_a_viewer_of_all_batches_may_export_others_batches(client_for: Any, make_user: Any, finished: BatchJob) -> None:
    viewer = make_user("victor")
    grant(viewer, "view_batchjob")
    assert body(get_export(client_for(viewer), finished)).count(b"\n") == 4


def test_the_accept_header_does_not_refuse_a_download_and_errors_stay_problems(
    api_client: Any, finished: BatchJob
) -> None:
    assert body(get_export(api_client, finished, "csv", HTTP_ACCEPT="text/csv")).startswith(b"index,")
    assert body(get_export(api_client, finished, HTTP_ACCEPT="text/html")).count(b"\n") == 4
    assert_problem(get_export(api_client, finished, "nope", HTTP_ACCEPT="text/html"), 400)


def test_chunks_follow_the_index_across_chunk_boundaries(
    api_client: Any, submit: Any, user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "FIRST_CHUNK_ROWS", 3)
    monkeypatch.setattr(export, "MIN_CHUNK_ROWS", 2)
    monkeypatch.setattr(export, "MAX_CHUNK_ROWS", 2)
    batch = submit("demo.noop", [{"i": i} for i in range(8)], created_by=user)
    reads: list[int] = []
    real = selectors.export_chunk
    monkeypatch.setattr(
        selectors,
        "export_chunk",
        lambda batch_id, *, after, limit: reads.append(limit) or real(batch_id, after=after, limit=limit),
    )
    lines = body(get_export(api_client, batch)).decode().splitlines()
    assert [json.loads(line)["params"]["i"] for line in lines] == list(range(8))
    assert reads == [3, 2, 2, 2]  # 3 + 2 + 2 + 1: the short chunk ends it


# --- lone surrogates and NaN: SQLite stores them in results (PostgreSQL refuses them) ----------


def test_encoding_survives_lone_surrogates_and_non_finite_numbers() -> None:
    keys = selectors.JsonKeys(keys=("\ud800k",), overflow=True)
    layout = export.Layout("csv", False, params=selectors.JsonKeys((), False), result=keys)
    row = (0, None, "succeeded", 1, {}, {"\ud800k": "x\udfff", "nan": float("nan")}, "")
    assert layout.head().decode() == "index,status,attempts,result.\ufffdk,result,error\r\n"
    assert layout.encode([row]).decode() == '0,succeeded,1,x\ufffd,"{""nan"":NaN}",\r\n'
    line = export.Layout("jsonl", False).encode([row])
    assert json.loads(line) == {
        "index": 0,
        "status": "succeeded",
        "attempts": 1,
        "params": {},
        "result": {"\ud800k": "x\udfff", "nan": None},  # escaped surrogates, NaN as null: valid JSON
        "error": "",
    }
    line.decode("utf-8")  # valid UTF-8


@pytest.mark.skipif(connection.vendor != "sqlite", reason="only SQLite stores lone surrogates")
def test_a_stored_lone_surrogate_key_in_results_exports_on_sqlite(api_client: Any, submit: Any, user: Any) -> None:
    batch = run_all(submit("demo.noop", [{}], created_by=user), lambda i: ("succeeded", {"\ud800": "v\udc00"}, ""))
    assert (
        body(get_export(api_client, batch, "csv")).decode()
        == "index,status,attempts,result.\ufffd,error\r\n0,succeeded,1,v\ufffd,\r\n"
    )
    assert json.loads(body(get_export(api_client, batch)))["result"] == {"\ud800": "v\udc00"}


# --- ASGI: an async iterator that reads chunk by chunk -------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_stream_is_async_reads_one_chunk_at_a_time_and_holds_no_connection(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgiref.sync import sync_to_async
    from rest_framework.authtoken.models import Token

    monkeypatch.setattr(export, "FIRST_CHUNK_ROWS", 2)
    monkeypatch.setattr(export, "MAX_CHUNK_ROWS", 2)
    monkeypatch.setattr(export, "MIN_CHUNK_ROWS", 2)
    submitted = await sync_to_async(services.submit_batch)(
        handler="demo.noop", items=[{"i": i} for i in range(7)], created_by=user
    )
    token = (await sync_to_async(Token.objects.get_or_create)(user=user))[0].key
    reads: list[int] = []
    real = selectors.export_chunk
    monkeypatch.setattr(
        selectors, "export_chunk", lambda b, *, after, limit: reads.append(after) or real(b, after=after, limit=limit)
    )

    headers = {"Authorization": f"Token {token}", "Accept": "application/json"}
    url = f"/api/batches/{submitted.batch.pk}/export/?as=jsonl"
    response = await asyncio.wait_for(AsyncClient().get(url, headers=headers), timeout=30)
    assert response.status_code == 200 and response.is_async, response.content
    stream = aiter(response.streaming_content)
    first = await asyncio.wait_for(anext(stream), timeout=30)
    assert [json.loads(line)["index"] for line in first.splitlines()] == [0, 1]
    assert reads == [-1]  # nothing read ahead of what was sent
    assert await sync_to_async(lambda: connection.connection is None)()  # and no connection held meanwhile
    rest = [chunk async for chunk in stream]
    assert [json.loads(line)["index"] for line in b"".join([first, *rest]).splitlines()] == list(range(7))
    assert reads == [-1, 1, 3, 5]


# --- admin -----------------------------------------------------------------------------------


@pytest.fixture
def admin_client(make_user: Callable[..., Any]) -> Client:
    staff = make_user("viewer", is_staff=True)
    grant(staff, "view_batchjob")
    client = Client()
    client.force_login(staff)
    return client


def test_admin_download_results_streams_the_csv_of_exactly_one_batch(
    admin_client: Client, finished: BatchJob, submit: Any, user: Any
) -> None:
    data = {"action": "download_results", "_selected_action": [str(finished.pk)]}
    response = admin_client.post("/admin/batch/batchjob/", data)
    assert response["Content-Disposition"] == f'attachment; filename="batch-{finished.pk}.csv"'
    assert body(response) == body(get_export(admin_client, finished, "csv"))
    other = submit("demo.noop", [{}], created_by=user)
    data["_selected_action"] = [str(finished.pk), str(other.pk)]
    page = admin_client.post("/admin/batch/batchjob/", data, follow=True).content.decode()
    assert "Select exactly one batch to download its results." in page


def test_admin_batch_page_links_to_both_exports(admin_client: Client, finished: BatchJob) -> None:
    page = admin_client.get(f"/admin/batch/batchjob/{finished.pk}/change/").content.decode()
    assert f'href="/api/batches/{finished.pk}/export/?as=csv"' in page
    assert f'href="/api/batches/{finished.pk}/export/?as=jsonl"' in page


def test_admin_without_view_permission_has_no_download(make_user: Callable[..., Any], finished: BatchJob) -> None:
    client = Client()
    client.force_login(make_user("bare", is_staff=True))
    data = {"action": "download_results", "_selected_action": [str(finished.pk)]}
    assert client.post("/admin/batch/batchjob/", data).status_code == 403


# --- memory of a 100,000-item export --------------------------------------------------------

BIG = 100_000
MEMORY_BOUND = 50 * 1024 * 1024


def big_batch(user: Any) -> BatchJob:
    """100,000 items like a forecast's: params and an object result each (written in bulk: arranging
    the rows through the worker's path would take minutes)."""
    params = [{"store": f"S{i % 500}", "product": f"P{i // 500}", "horizon": 28} for i in range(BIG)]
    batch = services.submit_batch(handler="demo.noop", items=params, created_by=user, max_parallel=4).batch
    result = {"mape_naive": 0.123456, "mape_ma": 0.234567, "best": "seasonal_naive", "forecast": [1.5] * 28}
    BatchJobItem.objects.filter(batch_id=batch.pk).update(status=ItemStatus.SUCCEEDED, attempts=1, result=result)
    BatchJob.objects.filter(pk=batch.pk).update(status=BatchStatus.SUCCEEDED, succeeded_items=BIG)
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_100000_item_export_streams_in_bounded_memory(api_client: Any, user: Any, fmt: str) -> None:
    batch = big_batch(user)
    tracemalloc.start()
    try:
        response = get_export(api_client, batch, fmt)
        lines = size = 0
        for chunk in response.streaming_content:
            lines, size = lines + chunk.count(b"\n"), size + len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == BIG + (fmt == "csv")
    assert size > 10 * 1024 * 1024  # a body of tens of MiB: what is held is a chunk, not the body
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB"
    print(f"{fmt}: {size / 2**20:.1f} MiB streamed, tracemalloc peak {peak / 2**20:.1f} MiB")
