"""`GET /health/`: the cluster health as JSON for load balancers and orchestrators.

Open (no authentication), so it carries counts and ages only: no worker ids, hosts or pids.
200 when healthy, 503 when not (or when the database is unreachable).
"""

from __future__ import annotations

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from batch.health import cluster_health


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    try:
        report = cluster_health()
    except DatabaseError:
        return JsonResponse({"healthy": False, "problems": ["database unreachable"]}, status=503)
    return JsonResponse(report.as_dict(public=True), status=200 if report.healthy else 503)
