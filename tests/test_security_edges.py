"""Security round 2 (issue 15), the HTTP edge: request charsets, tiny-item floods, lone
surrogates, format suffixes, deep form nesting. Each answer is a problem body, nothing written."""

from __future__ import annotations

import bz2
import json
import time
import zlib
from typing import Any

import pytest
from django.db import connections

from batch.models import BatchAuditEvent, BatchJob, BatchJobItem
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


def assert_nothing_written() -> None:
    assert (BatchJob.objects.count(), BatchJobItem.objects.count(), BatchAuditEvent.objects.count()) == (0, 0, 0)


def submit_body(items: Any, **extra: Any) -> str:
    return json.dumps({"handler": "demo.noop", "items": items, **extra})


# --- 1. the request charset is a codec name, not a decompressor -----------------------------------

NON_TEXT_CHARSETS = ["bz2", "zlib", "base64", "hex", "rot_13", "rot13", "uu", "quopri", "zip", "latin-1", "utf-7"]


def bz2_bomb(size: int = 64 * 1024 * 1024) -> bytes:
    """A few hundred bytes that decompress to `size` bytes of a JSON string."""
    return bz2.compress(b'{"handler": "demo.noop", "items": [{}], "name": "' + b"a" * size + b'"}')


def test_compressing_charset_is_refused_with_415_before_decoding(api_client: Any) -> None:
    bomb = bz2_bomb()
    assert len(bomb) < 1000
    started = time.monotonic()
    response = api_client.post("/api/batches/", bomb, content_type="application/json; charset=bz2")
    body = assert_problem(response, 415)
    assert time.monotonic() - started < 1.0  # decompressing it takes seconds
    assert "charset" in body["detail"]
    assert_nothing_written()


@pytest.mark.parametrize("charset", NON_TEXT_CHARSETS)
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_every_non_utf8_charset_is_415_on_submit(api_client: Any, charset: str, content_type: str) -> None:
    encoded = zlib.compress(submit_body([{}]).encode()) if charset == "zlib" else submit_body([{}]).encode()
    response = api_client.post("/api/batches/", encoded, content_type=f"{content_type}; charset={charset}")
    assert_problem(response, 415)
    assert_nothing_written()


@pytest.mark.parametrize("charset", ["bz2", "zlib", "rot13"])
def test_non_utf8_charset_is_415_on_resize_admin_and_login(
    api_client: Any, user: Any, submit: Any, client: Any, charset: str
) -> None:
    batch = submit("demo.sleep", [{"seconds": 1}], created_by=user)
    patch = api_client.patch(
        f"/api/batches/{batch.pk}/",
        zlib.compress(b'{"max_parallel": 1}'),
        content_type=f"application/json; charset={charset}",
    )
    assert_problem(patch, 415)
    batch.refresh_from_db()
    assert batch.max_parallel == 4
    for path in ("/admin/login/", "/api/auth/login/"):
        form_type = f"application/x-www-form-urlencoded; charset={charset}"
        form = client.generic("POST", path, b"username=alice&password=pw", content_type=form_type)
        assert_problem(form, 415)


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "utf8", '"utf-8"'])
def test_utf8_charset_is_accepted(api_client: Any, charset: str) -> None:
    response = api_client.post("/api/batches/", submit_body([{}]), content_type=f"application/json; charset={charset}")
    assert response.status_code == 201, response.content


@pytest.mark.django_db(transaction=True)
async def test_asgi_refuses_a_bz2_bomb_with_415() -> None:
    from tests.test_security_limits import asgi_post

    bomb = bz2_bomb()
    headers = [(b"content-type", b"application/json; charset=bz2"), (b"content-length", str(len(bomb)).encode())]
    started = time.monotonic()
    status, body, _ = await asgi_post([bomb], headers)
    assert (status, body["status"]) == (415, 415)
    assert time.monotonic() - started < 1.0


# --- 4. many tiny items are counted while parsing -------------------------------------------------


def tiny_items_body(count: int) -> bytes:
    return b'{"handler": "demo.noop", "items": [' + b",".join([b"{}"] * count) + b"]}"


@pytest.mark.parametrize("item", [b"{}", b"[]"])
def test_a_63_mib_body_of_tiny_items_is_413_at_once_with_bounded_memory(api_client: Any, item: bytes) -> None:
    import tracemalloc

    body = b'{"handler": "demo.noop", "items": [' + b",".join([item] * (63 * 1024 * 1024 // (len(item) + 1))) + b"]}"
    assert len(body) < 64 * 1024 * 1024  # under DATA_UPLOAD_MAX_MEMORY_SIZE: only the item count stops it
    tracemalloc.start()
    started = time.monotonic()
    try:
        response = api_client.post("/api/batches/", body, content_type="application/json")
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    problem = assert_problem(response, 413)
    assert "100000" in problem["errors"]["items"][0]
    assert elapsed < 5  # 40 s before, most of it building 22 million dicts (generous: tracemalloc slows it)
    assert peak < 6 * len(body)  # the body and its text, not the 2.4 GB of parsed items
    assert_nothing_written()


def test_tiny_items_in_a_form_field_are_413_too(api_client: Any, settings: Any) -> None:
    settings.BATCH_MAX_ITEMS_PER_BATCH = 10
    items = "[" + ",".join(["{}"] * 11) + "]"
    response = api_client.post("/api/batches/", {"handler": "demo.noop", "items": items}, format="multipart")
    assert "items" in assert_problem(response, 413)["errors"]
    form = api_client.generic(
        "POST", "/api/batches/", f"handler=demo.noop&items={items}", content_type="application/x-www-form-urlencoded"
    )
    assert "items" in assert_problem(form, 413)["errors"]
    assert_nothing_written()


def test_items_at_the_limit_are_accepted(api_client: Any, settings: Any) -> None:
    settings.BATCH_MAX_ITEMS_PER_BATCH = 10
    response = api_client.post("/api/batches/", tiny_items_body(10), content_type="application/json")
    assert response.status_code == 201, response.content
    assert response.json()["total_items"] == 10


@pytest.mark.django_db(transaction=True)
def test_concurrent_submits_of_one_user_are_bounded_with_429(
    client_for: Any, user: Any, make_user: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from batch import services

    settings.BATCH_MAX_CONCURRENT_SUBMITS_PER_USER = 2
    inside, release = threading.Barrier(3), threading.Event()
    real_submit = services.submit_batch

    def gated_submit(**kwargs: Any) -> Any:
        if kwargs["created_by"] == user:
            inside.wait(timeout=10)
            assert release.wait(timeout=10)
        return real_submit(**kwargs)

    monkeypatch.setattr(services, "submit_batch", gated_submit)
    codes: list[int] = []

    def post() -> None:
        try:
            response = client_for(user).post("/api/batches/", submit_body([{}]), content_type="application/json")
            codes.append(response.status_code)
        finally:
            connections.close_all()  # this thread's connection, or the test database cannot be dropped

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait(timeout=10)  # both submits are in progress
    third = client_for(user).post("/api/batches/", submit_body([{}]), content_type="application/json")
    other = client_for(make_user("bob")).post("/api/batches/", submit_body([{}]), content_type="application/json")
    release.set()
    for thread in threads:
        thread.join(timeout=10)
    assert_problem(third, 429)
    assert third["Retry-After"] == "1"
    assert other.status_code == 201  # another user is not held up
    assert sorted(codes) == [201, 201]
    assert BatchJob.objects.count() == 3


# --- 6. lone surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [r'{"store": "\ud800"}', r'{"\udfff": 1}', r'{"a": [{"b": {"c": ["x\udc00y"]}}]}', r'{"k\ud83d": {"\ud800": 0}}'],
    ids=["value", "key", "deep-value", "key-and-nested-key"],
)
def test_lone_surrogates_in_item_params_are_400_naming_the_index(api_client: Any, item: str) -> None:
    raw = '{"handler": "demo.noop", "items": [{}, {}, ' + item + "]}"
    body = assert_problem(api_client.post("/api/batches/", raw, content_type="application/json"), 400)
    assert list(body["errors"]["items"]) == ["2"]
    assert "surrogate" in body["errors"]["items"]["2"][0]
    assert_nothing_written()


def test_lone_surrogate_in_name_and_through_the_service_is_refused(api_client: Any) -> None:
    from batch import services

    raw = r'{"handler": "demo.noop", "items": [{}], "name": "x\ud800"}'
    assert (
        "name" in assert_problem(api_client.post("/api/batches/", raw, content_type="application/json"), 400)["errors"]
    )
    with pytest.raises(services.SubmitError) as caught:
        services.submit_batch(handler="demo.noop", items=[{}, {"k": ["\ud800"]}])
    assert list(caught.value.errors["items"]) == ["1"]
    assert_nothing_written()


def test_paired_surrogates_are_ordinary_text(api_client: Any) -> None:
    raw = r'{"handler": "demo.noop", "items": [{"emoji": "\ud83d\ude00"}]}'
    response = api_client.post("/api/batches/", raw, content_type="application/json")
    assert response.status_code == 201, response.content
    items = api_client.get(response.json()["items_url"]).json()["results"]
    assert items[0]["params"] == {"emoji": "\U0001f600"}


# --- 7. routes that answered 500 -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/batches.json"),
        ("get", "/api/batches/{id}.json"),
        ("get", "/api/batches/{id}/items.json"),
        ("post", "/api/batches/{id}/cancel.json"),
        ("delete", "/api/batches/{id}.json"),
        ("patch", "/api/batches/{id}.json"),
        ("get", "/api/batches/{id}/events.json"),
        ("get", "/api/.json"),
    ],
)
@pytest.mark.parametrize("who", ["owner", "stranger", "anonymous"])
def test_format_suffix_routes_are_404_problems(
    client_for: Any, user: Any, make_user: Any, submit: Any, method: str, path: str, who: str
) -> None:
    batch = submit("demo.sleep", [{"seconds": 1}], created_by=user)
    caller = {"owner": user, "stranger": make_user("mallory"), "anonymous": None}[who]
    response = getattr(client_for(caller), method)(path.format(id=batch.pk))
    assert_problem(response, 404)
    batch.refresh_from_db()
    assert batch.status == "pending"


def test_format_query_parameter_still_works(api_client: Any) -> None:
    response = api_client.get("/api/batches/?format=json")
    assert response.status_code == 200
    assert response.json()["count"] == 0


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart"])
def test_deeply_nested_form_field_is_400_not_500(api_client: Any, content_type: str) -> None:
    items = "[" * 100_000 + "]" * 100_000
    if content_type == "multipart":
        response = api_client.post("/api/batches/", {"handler": "demo.noop", "items": items}, format="multipart")
    else:
        body = f"handler=demo.noop&items={items}"
        response = api_client.generic("POST", "/api/batches/", body, content_type=content_type)
    body_ = assert_problem(response, 400)
    assert "nested too deeply" in str(body_["errors"]["items"])
    assert_nothing_written()


@pytest.mark.parametrize(
    "query",
    [
        "/admin/batch/batchjob/?status__exact=%00",
        "/admin/batch/batchjob/?handler__exact=a%00b",
        "/admin/batch/batchjob/?q=%00",
        "/admin/batch/batchjobitem/?status__exact=%00",
        "/api/batches/?handler=%00",
        "/api/batches/?status=%00",
    ],
)
def test_nul_in_a_query_string_is_400_not_500(make_user: Any, query: str) -> None:
    from django.test import Client

    root = make_user("root", is_staff=True, is_superuser=True)
    client = Client(HTTP_ACCEPT="application/json")
    client.force_login(root)
    assert_problem(client.get(query), 400)
