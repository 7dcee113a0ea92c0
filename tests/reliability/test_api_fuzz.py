"""Fuzz every operation of the OpenAPI schema anonymously and as a user who owns nothing there.

Complements tests/test_api_schema.py (the owner's view, response-schema conformance): here every
answer must be below 500, and every error a problem-details body; anonymous calls get 401, and
another user's batch is never revealed (404, with nothing of the batch in the body).
"""

from __future__ import annotations

import json
import uuid
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
PUBLIC: set[str] = set()  # the schema and its docs need a token too (issue 15)
CASES = {"anonymous": 0, "stranger": 0}
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nschemathesis cases: {CASES}")


@pytest.fixture
def _wsgi(settings: Any) -> Iterator[None]:
    """Keep the test's connection (as Django's test client does) and switch throttling off."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    settings.BATCH_SUBMIT_THROTTLE_RATE = settings.BATCH_CANCEL_THROTTLE_RATE = ""
    cache.clear()
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)
    cache.clear()
    control_watcher.stop()


def assert_problem(response: Any) -> dict[str, Any]:
    assert response.status_code < 500, response.text
    if response.status_code < 400:
        return {}
    headers = {key.lower(): value for key, value in response.headers.items()}
    content_type = headers.get("content-type")
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert str(content_type).startswith("application/problem+json"), response.headers
    body: dict[str, Any] = json.loads(response.text)
    assert {"type", "title", "status", "detail", "instance"} <= body.keys(), body
    assert body["status"] == response.status_code
    assert "Traceback" not in response.text
    return body


@pytest.mark.django_db
@pytest.mark.usefixtures("_wsgi")
@schema.parametrize()
@FUZZ
def test_anonymous_calls_get_401_problems(case: Any) -> None:
    CASES["anonymous"] += 1
    response = case.call(headers={"Accept": "application/json"})
    case.validate_response(response, checks=[checks.not_a_server_error, checks.status_code_conformance])
    assert_problem(response)
    if case.path not in PUBLIC:
        # 404 only for an id that is no UUID: the URL itself does not exist.
        allowed = (401, 405, 406, 404) if not _is_uuid((case.path_parameters or {}).get("id")) else (401, 405, 406)
        assert response.status_code in allowed, (case.method, case.path, case.path_parameters, response.status_code)


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return value is not None


@pytest.mark.django_db
@pytest.mark.usefixtures("_wsgi")
@schema.parametrize()
@FUZZ
def test_a_stranger_gets_problems_and_never_sees_another_users_batch(
    case: Any, django_user_model: Any, submit: Any
) -> None:
    from rest_framework.authtoken.models import Token

    CASES["stranger"] += 1  # hypothesis runs many examples in one test (one transaction)
    owner = django_user_model.objects.get_or_create(username="owner")[0]
    stranger = django_user_model.objects.get_or_create(username="stranger")[0]
    secret = submit("demo.sleep", [{"seconds": 1}] * 2, created_by=owner, name="owner-secret")
    if "id" in (case.path_parameters or {}):
        case.path_parameters["id"] = str(secret.pk)
    headers = {
        "Authorization": f"Token {Token.objects.get_or_create(user=stranger)[0].key}",
        "Accept": "application/json",
    }
    response = case.call(headers=headers)
    case.validate_response(response, checks=[checks.not_a_server_error, checks.status_code_conformance])
    assert_problem(response)
    shown = response.text
    if response.status_code >= 400:  # `instance` echoes the requested path: not a leak
        shown = json.dumps({k: v for k, v in json.loads(response.text).items() if k != "instance"})
    assert "owner-secret" not in shown and str(secret.pk) not in shown
    secret.refresh_from_db()
    assert (secret.status, secret.max_parallel) == ("pending", 4)
