"""Bad input through the API and the services: a 400/413/415 problem naming the field, nothing written."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import DatabaseError

from batch import services
from batch.models import BatchAuditEvent, BatchJob, BatchJobItem
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


def post_raw(client: Any, body: str | bytes, content_type: str = "application/json", **extra: Any) -> Any:
    return client.post("/api/batches/", body, content_type=content_type, **extra)


def assert_nothing_written() -> None:
    assert (BatchJob.objects.count(), BatchJobItem.objects.count(), BatchAuditEvent.objects.count()) == (0, 0, 0)


def submit_body(items: Any, **extra: Any) -> str:
    return json.dumps({"handler": "demo.noop", "items": items, **extra})


# --- sizes ---------------------------------------------------------------------------------------


def test_oversized_body_is_413(api_client: Any, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    assert_problem(post_raw(api_client, submit_body([{"pad": "x" * 3000}])), 413)
    assert_nothing_written()


def test_too_many_items_is_413_naming_items(api_client: Any, settings: Any) -> None:
    settings.BATCH_MAX_ITEMS_PER_BATCH = 5
    body = assert_problem(post_raw(api_client, submit_body([{}] * 6)), 413)
    assert "items" in body["errors"]
    assert_nothing_written()


def test_oversized_item_params_is_400_with_index(api_client: Any, settings: Any) -> None:
    settings.BATCH_MAX_ITEM_PARAMS_BYTES = 100
    body = assert_problem(post_raw(api_client, submit_body([{}, {"pad": "x" * 200}])), 400)
    assert list(body["errors"]["items"]) == ["1"]
    assert "bytes" in body["errors"]["items"]["1"][0]
    assert_nothing_written()


def test_deeply_nested_params_are_400_with_index(api_client: Any) -> None:
    nested: Any = 1
    for _ in range(25):
        nested = {"a": nested}
    body = assert_problem(post_raw(api_client, submit_body([{}, {}, nested])), 400)
    assert "Nested deeper" in body["errors"]["items"]["2"][0]
    assert_nothing_written()


def test_pathologically_deep_json_is_400_not_500(api_client: Any) -> None:
    deep = '{"handler": "demo.noop", "items": [' + "[" * 50_000 + "]" * 50_000 + "]}"
    assert "nested too deeply" in assert_problem(post_raw(api_client, deep), 400)["detail"]
    assert_nothing_written()


# --- NUL and absurd strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        submit_body([{"store": "a\x00b"}]),
        submit_body([{"k\x00": 1}]),
        submit_body([{"nested": [{"deep": "\x00"}]}]),
    ],
    ids=["value", "key", "nested"],
)
def test_nul_anywhere_in_params_is_400_with_index(api_client: Any, body: str) -> None:
    assert "0" in assert_problem(post_raw(api_client, body), 400)["errors"]["items"]
    assert_nothing_written()


def test_nul_in_name_is_400_naming_name(api_client: Any) -> None:
    assert "name" in assert_problem(post_raw(api_client, submit_body([{}], name="x\x00")), 400)["errors"]
    assert_nothing_written()


def test_nul_or_long_idempotency_key_is_400(api_client: Any) -> None:
    for key in ("a\x00b", "k" * 256):
        assert (
            "Idempotency-Key"
            in assert_problem(post_raw(api_client, submit_body([{}]), HTTP_IDEMPOTENCY_KEY=key), 400)["errors"]
        )
    assert_nothing_written()


def test_long_name_is_400(api_client: Any) -> None:
    assert "name" in assert_problem(post_raw(api_client, submit_body([{}], name="n" * 201)), 400)["errors"]


# --- shape of the body ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("not json", "application/json", 400),
        (b"\xff\xfe{", "application/json", 400),
        ('{"handler": "demo.noop", "items": [{}], "max_parallel": NaN}', "application/json", 400),
        ('{"handler": "demo.noop", "handler": "demo.sleep", "items": [{}]}', "application/json", 400),
        ("[1, 2]", "application/json", 400),
        ("handler=demo.noop", "text/plain", 415),
        ("<batch/>", "application/xml", 415),
    ],
    ids=["not-json", "not-utf8", "nan", "duplicate-key", "not-an-object", "text-plain", "xml"],
)
def test_malformed_bodies_are_problems(api_client: Any, body: Any, content_type: str, status: int) -> None:
    assert_problem(post_raw(api_client, body, content_type), status)
    assert_nothing_written()


def test_unknown_top_level_field_is_400_naming_it(api_client: Any) -> None:
    body = assert_problem(post_raw(api_client, submit_body([{}], max_paralel=2)), 400)
    assert body["errors"] == {"max_paralel": ["Unknown field."]}
    assert_nothing_written()


@pytest.mark.parametrize("max_parallel", [0, -1, 10_001, 2**63, "many", 1.5, None])
def test_max_parallel_out_of_range_is_400(api_client: Any, max_parallel: Any) -> None:
    assert (
        "max_parallel"
        in assert_problem(post_raw(api_client, submit_body([{}], max_parallel=max_parallel)), 400)["errors"]
    )
    assert_nothing_written()


def test_resize_refuses_unknown_fields_and_bad_values(api_client: Any, user: Any, submit: Any) -> None:
    batch = submit("demo.sleep", [{"seconds": 1}], created_by=user)
    url = f"/api/batches/{batch.pk}/"
    for body in (
        '{"max_parallel": 2, "status": "cancelled"}',
        '{"max_parallel": 0}',
        '{"max_parallel": 2, "max_parallel": 3}',
    ):
        assert_problem(api_client.patch(url, body, content_type="application/json"), 400)
    batch.refresh_from_db()
    assert (batch.max_parallel, batch.status) == (4, "pending")


@pytest.mark.parametrize("value", ["-1", "301", "nan", "inf", "1e400", "soon"])
def test_drain_timeout_out_of_range_is_400_and_cancels_nothing(
    api_client: Any, user: Any, submit: Any, value: str
) -> None:
    batch = submit("demo.sleep", [{"seconds": 1}], created_by=user)
    assert (
        "drain_timeout"
        in assert_problem(api_client.delete(f"/api/batches/{batch.pk}/?drain_timeout={value}"), 400)["errors"]
    )
    batch.refresh_from_db()
    assert batch.status == "pending"


# --- the services apply the same limits (admin, commands) ---------------------------------------


def test_services_refuse_nul_depth_and_long_key_without_writing() -> None:
    deep: Any = [0]
    for _ in range(5_000):  # deeper than json.dumps could recurse: the walk is iterative
        deep = [deep]
    cases = [
        ({"items": [{"seconds": 0, "note": "\x00"}]}, "items"),
        ({"items": [{"seconds": 0, "x": deep}]}, "items"),
        ({"items": [{"seconds": 0}], "name": "\x00"}, "name"),
        ({"items": [{"seconds": 0}], "idempotency_key": "k" * 300}, "idempotency_key"),
        ({"items": [{"seconds": 0}], "handler": "demo.sleep\x00"}, "handler"),
    ]
    for kwargs, field in cases:
        with pytest.raises(services.SubmitError) as caught:
            services.submit_batch(**{"handler": "demo.sleep", **kwargs})
        assert field in caught.value.errors
    assert_nothing_written()


def test_database_error_answers_500_problem_without_sql_or_traceback(
    api_client: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.DEBUG = False

    def broken(**kwargs: Any) -> None:
        raise DatabaseError('relation "batch_job" does not exist LINE 1: SELECT secret_column FROM batch_job')

    monkeypatch.setattr(services, "submit_batch", broken)
    response = post_raw(api_client, submit_body([{}]))
    body = assert_problem(response, 500)
    assert body["detail"] == "The server failed to handle this request."
    assert "SELECT" not in response.content.decode()
    assert "batch_job" not in response.content.decode()


# --- the ASGI server refuses oversized bodies before Django spools them -------------------------


async def asgi_post(body_chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, Any], int]:
    """POST through batchsite.asgi; returns (status, problem body, chunks the app consumed)."""
    from channels.testing import ApplicationCommunicator

    from batchsite.asgi import application

    scope = {"type": "http", "method": "POST", "path": "/api/batches/", "query_string": b"", "headers": headers}
    communicator = ApplicationCommunicator(application, scope)
    for i, chunk in enumerate(body_chunks):
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": i < len(body_chunks) - 1})
    start = await communicator.receive_output(timeout=10)
    body = await communicator.receive_output(timeout=10)
    await communicator.wait(timeout=10)
    return start["status"], json.loads(body["body"]), len(body_chunks) - communicator.input_queue.qsize()


@pytest.mark.django_db(transaction=True)
async def test_asgi_refuses_declared_oversized_body_without_reading_it(settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    headers = [(b"content-type", b"application/json"), (b"content-length", b"999999999")]
    status, body, _ = await asgi_post([b"x" * 10], headers)
    assert (status, body["status"], body["title"]) == (413, 413, "Request too large")


@pytest.mark.django_db(transaction=True)
async def test_asgi_stops_reading_a_chunked_body_past_the_limit(settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    status, body, consumed = await asgi_post([b"x" * 600] * 10, [(b"content-type", b"application/json")])
    assert (status, body["status"]) == (413, 413)
    assert consumed < 10  # stopped after the limit, did not spool the rest
    assert await sync_to_async(BatchJob.objects.count)() == 0
