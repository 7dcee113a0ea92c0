"""`GET /metrics`: this web process's Prometheus metrics and the cluster gauges read from the database.

Never public: a staff session, or `Authorization: Bearer <BATCH_METRICS_TOKEN>` when a token is
configured (compared in constant time). Refusals are problem+json like the rest of the API: 401
without (valid) credentials, 403 for a signed-in user who is not staff.
"""

from __future__ import annotations

import hmac
import logging

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from batch.api.exceptions import PROBLEM_CONTENT_TYPE, problem
from batch.metrics import DATABASE_REGISTRY

logger = logging.getLogger(__name__)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    body = generate_latest(REGISTRY)
    try:
        body += generate_latest(DATABASE_REGISTRY)
    except DatabaseError:
        logger.warning("metrics: the database gauges are left out (database unreachable)", exc_info=True)
    return HttpResponse(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)  # what every Prometheus reads


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """None when the request may read the metrics, else the problem response."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        if _token_matches(credentials.strip()):
            return None
        return _problem(request, 401, "The bearer token is not valid for /metrics.")
    user = request.user
    if user.is_authenticated and user.is_staff and user.is_active:
        return None
    if user.is_authenticated:
        return _problem(request, 403, "Only staff or the metrics bearer token may read /metrics.")
    return _problem(request, 401, "Authentication credentials were not provided.")


def _token_matches(given: str) -> bool:
    expected = str(settings.BATCH_METRICS_TOKEN)
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _problem(request: HttpRequest, status: int, detail: str) -> HttpResponse:
    response = JsonResponse(
        problem(status, detail, request.get_full_path()), status=status, content_type=PROBLEM_CONTENT_TYPE
    )
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response
