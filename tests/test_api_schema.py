"""Fuzz the API against its own OpenAPI document (schemathesis, in-process WSGI, with a token).

Checks: no 5xx, documented status codes and content types, bodies that match the schema.
`max_examples` keeps the run well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis import checks

from batch.notify import control_watcher
from tests.openapi import load_schema

schema = load_schema()

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture
def _keep_test_connection() -> Iterator[None]:
    """The real WSGI handler closes the connection after each request, which would end the
    test's transaction; Django's test client disconnects the same receivers."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def auth_headers(user: Any, _keep_test_connection: None, settings: Any) -> Iterator[dict[str, str]]:
    from rest_framework.authtoken.models import Token

    settings.BATCH_SUBMIT_THROTTLE_RATE = ""  # 429 is documented, but would hide the rest
    cache.clear()
    yield {"Authorization": f"Token {Token.objects.create(user=user).key}", "Accept": "application/json"}
    cache.clear()
    control_watcher.stop()


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI must not flake on a new random find
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_schema(case: Any, auth_headers: dict[str, str], submit: Any, user: Any) -> None:
    if "id" in (case.path_parameters or {}) and str(case.path_parameters["id"])[:1] in "01234567":
        # About half of the detail calls go to a real batch of this user instead of a random id.
        case.path_parameters["id"] = str(submit("demo.sleep", [{"seconds": 1}] * 3, created_by=user).pk)
    response = case.call(headers=auth_headers)
    case.validate_response(response, checks=CHECKS, headers=auth_headers)
