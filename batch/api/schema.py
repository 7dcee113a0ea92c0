"""OpenAPI: every operation documents its problem-details responses (application/problem+json)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema

from batch.api.exceptions import PROBLEM_CONTENT_TYPE
from batch.api.serializers import DrainTimeoutProblemSerializer, ProblemSerializer

_COMMON = (400, 401, 403, 404, 406, 429)
_BY_METHOD: dict[str, tuple[int, ...]] = {
    "POST": (409, 413, 415, 504),
    "PATCH": (409, 413, 415),
    "DELETE": (409, 504),
}

_WAITING = ("cancel", "pause")  # POST actions that wait and may answer 504
_CONFLICTING = ("cancel", "pause", "resume", "retry")  # POST actions refused by a batch's state (409)
_BODILESS = ("cancel", "pause", "resume")  # POST actions without a body (no 413/415)


class ProblemAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        action = getattr(self.view, "action", "")
        for code in (*_COMMON, *_BY_METHOD.get(self.method, ())):
            if self.method == "POST" and code == 409 and action not in _CONFLICTING:
                continue
            if self.method == "POST" and code == 504 and action not in _WAITING:
                continue
            if self.method == "POST" and code in (413, 415) and action in _BODILESS:
                continue
            serializer = DrainTimeoutProblemSerializer if code == 504 else ProblemSerializer
            responses.setdefault(
                str(code),
                self._get_response_for_code(serializer, str(code), [PROBLEM_CONTENT_TYPE], direction),  # type: ignore[no-untyped-call]
            )
        return responses
