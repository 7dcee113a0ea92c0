"""Middleware: a request body's charset must be UTF-8 (415 otherwise), decided before anything decodes it.

Django hands the `charset` parameter to Python's codec registry, which also holds
decompressors and transforms (`bz2`, `zlib`, `base64`, `hex`, `rot_13`, …): a 279-byte
`charset=bz2` body became 256 MiB of text, past every size limit, which measure the
compressed bytes. JSON is UTF-8 (RFC 8259) and browsers send forms in the page's UTF-8, so
that is the one charset accepted; a request without one is read as UTF-8 as before.
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


class Utf8RequestsOnly:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        charset = refused_charset(request.META.get("CONTENT_TYPE", ""))
        if charset is None:
            return self.get_response(request)
        detail = f"Unsupported request charset {charset[:40]!r}: send UTF-8 (charset=utf-8, or none)."
        body = problem(415, detail, request.get_full_path())
        return JsonResponse(body, status=415, content_type=PROBLEM_CONTENT_TYPE)
