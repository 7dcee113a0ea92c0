"""RFC 7807 problem details for every error the API answers.

`problem_exception_handler` is DRF's EXCEPTION_HANDLER; `server_error` and `page_not_found`
are Django's handler500/handler404, answering problem+json under /api/ too. The content
type is set here, not negotiated: clients send `Accept: application/json`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig, TooManyFieldsSent
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:batchsite:problem:"
API_PREFIX = "/api/"

_TITLES = {
    400: ("validation-error", "Invalid request"),
    401: ("not-authenticated", "Authentication required"),
    403: ("permission-denied", "Permission denied"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("too-large", "Request too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    429: ("throttled", "Too many requests"),
    500: ("server-error", "Internal server error"),
    504: ("drain-timeout", "Drain timed out"),
}


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The batch is already finished."
    default_code = "conflict"


class PayloadTooLarge(exceptions.APIException):
    """413. `errors` (optional) is reported like a validation error's."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request is too large."
    default_code = "too_large"

    def __init__(self, detail: str | None = None, *, errors: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors


class DrainTimeout(exceptions.APIException):
    """504: the batch is still cancelling; `extra` (the batch, its running count) goes in the body."""

    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_detail = "The batch is still cancelling; the cancel goes on."
    default_code = "drain_timeout"

    def __init__(self, detail: str, *, extra: dict[str, Any]) -> None:
        super().__init__(detail)
        self.extra = extra


def problem(status_code: int, detail: str, instance: str, **extra: Any) -> dict[str, Any]:
    slug, title = _TITLES.get(status_code, ("error", "Error"))
    return {
        "type": PROBLEM_TYPE_PREFIX + slug,
        "title": title,
        "status": status_code,
        "detail": detail,
        "instance": instance,
        **extra,
    }


def _body(exc: exceptions.APIException, instance: str) -> dict[str, Any]:
    if isinstance(exc, exceptions.ValidationError):
        errors = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return problem(exc.status_code, "The request is invalid; see `errors`.", instance, errors=errors)
    extra: dict[str, Any] = {}
    if isinstance(exc, PayloadTooLarge) and exc.errors is not None:
        extra["errors"] = exc.errors
    if isinstance(exc, DrainTimeout):
        extra.update(exc.extra)
    return problem(exc.status_code, str(exc.detail), instance, **extra)


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's handler, reshaped: every error becomes a problem-details response."""
    # Imported here: rest_framework.views loads the parser classes, which import this module.
    from rest_framework.views import exception_handler

    request = context.get("request")
    instance = request.get_full_path() if request is not None else ""
    response = exception_handler(_translate(exc), context)
    if response is None:
        logger.exception("unhandled error in API view", exc_info=exc)
        response = Response(problem(500, "The server failed to handle this request.", instance), status=500)
    else:
        response.data = _body(_as_api_exception(_translate(exc)), instance)
    if not _is_browsable(request):
        response.content_type = PROBLEM_CONTENT_TYPE
        if request is not None and not isinstance(getattr(request, "accepted_renderer", None), JSONRenderer):
            # An HTML-only view (the Swagger and ReDoc pages) would render the problem as text.
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), PROBLEM_CONTENT_TYPE
    return response


def _translate(exc: Exception) -> Exception:
    """Django's refusals of an oversized body (form parsers) as API errors."""
    if isinstance(exc, RequestDataTooBig):
        return PayloadTooLarge("The request body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE.")
    if isinstance(exc, TooManyFieldsSent):
        return exceptions.ValidationError({"non_field_errors": ["Too many form fields."]})
    return exc


def _as_api_exception(exc: Exception) -> exceptions.APIException:
    """Django's Http404 / PermissionDenied, which DRF's handler maps too."""
    if isinstance(exc, exceptions.APIException):
        return exc
    if isinstance(exc, Http404):
        return exceptions.NotFound()
    if isinstance(exc, PermissionDenied):
        return exceptions.PermissionDenied()
    return exceptions.APIException()


def _is_browsable(request: Any) -> bool:
    renderer = getattr(request, "accepted_renderer", None)
    return getattr(renderer, "format", None) == "api"


def _problem_response(request: HttpRequest, status_code: int, detail: str) -> HttpResponse:
    body = problem(status_code, detail, request.get_full_path())
    return JsonResponse(body, status=status_code, content_type=PROBLEM_CONTENT_TYPE)


def server_error(request: HttpRequest, template_name: str = "500.html") -> HttpResponse:
    """handler500: problem+json under /api/, Django's page elsewhere. Never a traceback."""
    if request.path.startswith(API_PREFIX):
        return _problem_response(request, 500, "The server failed to handle this request.")
    return defaults.server_error(request, template_name)


def page_not_found(request: HttpRequest, exception: Exception, template_name: str = "404.html") -> HttpResponse:
    """handler404: problem+json for unknown paths under /api/."""
    if request.path.startswith(API_PREFIX):
        return _problem_response(request, 404, "No such resource.")
    return defaults.page_not_found(request, exception, template_name)
