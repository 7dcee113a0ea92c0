"""Security round 3, the lifecycle surfaces: submit's stop rules and callback_url, export
(HEAD, concurrency, CSV injection, headers), the webhook's URL check and delivery, /metrics,
and how handler errors render. Each refusal is a problem body naming the field, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batch import services
from batch.models import BatchJob
from tests.problems import assert_problem

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_throttle")]


def post_submit(api_client: Any, **fields: Any) -> Any:
    body = json.dumps({"handler": "demo.noop", "items": [{}], **fields})
    return api_client.post("/api/batches/", body, content_type="application/json")


# --- submit's new fields: every bad value is a 400 naming it -----------------------------------


@pytest.mark.parametrize("value", [2**31, 2**63, 10**40])
def test_huge_max_failures_is_400_not_500(api_client: Any, value: int) -> None:
    body = assert_problem(post_submit(api_client, max_failures=value), 400)
    assert "max_failures" in body["errors"]
    assert not BatchJob.objects.exists()


def test_huge_max_failures_is_refused_by_the_service_too() -> None:
    with pytest.raises(services.SubmitError) as raised:
        services.submit_batch(handler="demo.noop", items=[{}], max_failures=2**63)
    assert "max_failures" in raised.value.errors
    assert not BatchJob.objects.exists()


def test_largest_max_failures_is_accepted(api_client: Any) -> None:
    response = post_submit(api_client, max_failures=2**31 - 1)
    assert response.status_code == 201, response.content
    assert response.json()["max_failures"] == 2**31 - 1


BAD_FIELD_VALUES = [
    ("max_failures", True),
    ("max_failures", 1.5),
    ("max_failures", "x"),
    ("max_failures", [1]),
    ("max_failures", {}),
    ("max_failures", 0),
    ("max_failures", "9" * 2000),
    ("max_attempts", None),
    ("max_attempts", True),
    ("max_attempts", 0),
    ("max_attempts", 2**70),
    ("deadline_seconds", False),
    ("deadline_seconds", "1e3"),
    ("deadline_seconds", 1e308),
    ("deadline_seconds", 2**70),
    ("deadline_seconds", 0),
    ("callback_url", None),
    ("callback_url", True),
    ("callback_url", 5),
    ("callback_url", ["http://x/"]),
    ("callback_url", {"url": "http://x/"}),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELD_VALUES)
def test_bad_stop_rule_or_callback_url_is_400_naming_the_field(api_client: Any, field: str, value: Any) -> None:
    body = assert_problem(post_submit(api_client, **{field: value}), 400)
    assert list(body["errors"]) == [field]
    assert not BatchJob.objects.exists()
