"""Strict request parsing and the cancel throttle: bad input becomes a 400/413 problem, never a 500.

- `StrictJSONParser`: the size limit of `LimitedJSONParser`, plus duplicate keys refused (two
  parsers reading `{"max_parallel": 1, "max_parallel": 9}` differently is how a proxy's check
  and the server's reading diverge) and deep nesting refused (Python's decoder would raise
  RecursionError, a 500).
- `RejectUnknownFields`: a serializer mixin; a misspelt field (`max_paralel`) is an error, not
  a silent default.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.http import QueryDict
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.throttling import UserRateThrottle
from rest_framework.utils import json

from batch.api.parsers import LimitedJSONParser

FORM_ONLY_FIELDS = frozenset({"csrfmiddlewaretoken"})  # the browsable API's HTML forms


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:100]!r}")
            seen.add(key)
    return result


class _StrictDecoding(JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.getreader(encoding)(stream).read()
            return json.loads(text, parse_constant=json.strict_constant, object_pairs_hook=_unique_keys)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


class StrictJSONParser(LimitedJSONParser, _StrictDecoding):
    """Size-limited (413), then strictly decoded (400): no duplicate keys, NaN or deep nesting."""


class RejectUnknownFields(serializers.Serializer[dict[str, Any]]):
    """Refuse input fields the serializer does not declare (400, one error per field)."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if isinstance(data, Mapping):
            ignored = FORM_ONLY_FIELDS if isinstance(data, QueryDict) else frozenset()
            unknown = sorted(str(key) for key in data if key not in self.fields and key not in ignored)
            if unknown:
                raise serializers.ValidationError({key[:100]: ["Unknown field."] for key in unknown[:20]})
        return dict(super().to_internal_value(data))


class CancelRateThrottle(UserRateThrottle):
    """Per user (per IP when anonymous): BATCH_CANCEL_THROTTLE_RATE, e.g. "120/min"; empty = off."""

    scope = "batch_cancel"

    def get_rate(self) -> str | None:
        return settings.BATCH_CANCEL_THROTTLE_RATE or None
