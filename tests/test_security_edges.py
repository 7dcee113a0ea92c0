"""Security round 2 (issue 15), the HTTP edge: request charsets, tiny-item floods, lone
surrogates, format suffixes, deep form nesting. Each answer is a problem body, nothing written."""

from __future__ import annotations

import bz2
import json
import time
import zlib
from typing import Any

import pytest

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
