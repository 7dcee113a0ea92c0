"""Middleware: checks of every request on every route, before any view or parser reads it.

`Utf8RequestsOnly`: a request body's charset must be UTF-8 (415 otherwise). Django hands the
`charset` parameter to Python's codec registry, which also holds decompressors and transforms
(`bz2`, `zlib`, `base64`, `hex`, `rot_13`, …): a 279-byte `charset=bz2` body became 256 MiB
of text, past every size limit, which measure the compressed bytes. JSON is UTF-8 (RFC 8259)
and browsers send forms in the page's UTF-8, so that is the one charset accepted; a request
without one is read as UTF-8 as before.

`NoNulInQuery`: a NUL character in the query string is 400. PostgreSQL refuses NUL in text,
so `?status__exact=%00` on an admin changelist reached the database and answered 500.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.http import parse_header_parameters

from batch.api.exceptions import PROBLEM_CONTENT_TYPE, problem

ACCEPTED_CHARSETS = frozenset({"utf-8", "utf8"})


def refused_charset(content_type: str) -> str | None:
    """The charset of a Content-Type header if it is not UTF-8, else None (also when absent)."""
    _, params = parse_header_parameters(content_type)  # as Django reads it for request.encoding
    charset = params.get("charset")
    if charset is None or charset.strip().lower() in ACCEPTED_CHARSETS:
        return None
    return charset


def _refuse(request: HttpRequest, status: int, detail: str) -> HttpResponse:
    body = problem(status, detail, request.get_full_path())
    return JsonResponse(body, status=status, content_type=PROBLEM_CONTENT_TYPE)


class Utf8RequestsOnly:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        charset = refused_charset(request.META.get("CONTENT_TYPE", ""))
        if charset is None:
            return self.get_response(request)
        return _refuse(
            request, 415, f"Unsupported request charset {charset[:40]!r}: send UTF-8 (charset=utf-8, or none)."
        )


class NoNulInQuery:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if any("\x00" in key or "\x00" in value for key, value in request.GET.items()):
            return _refuse(request, 400, "NUL characters are not allowed in the query string.")
        return self.get_response(request)
