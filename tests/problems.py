"""Assertions on RFC 7807 problem responses, shared by the API and security tests."""

from __future__ import annotations

import json
from typing import Any


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """The response is an `application/problem+json` error with `status`; returns its body."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(response.content)
    assert {"type", "title", "status", "detail", "instance"} <= body.keys()
    assert body["status"] == status
    assert "Traceback" not in response.content.decode()
    return body
