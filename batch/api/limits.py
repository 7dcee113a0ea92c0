"""Strict request parsing and the cancel throttle: bad input becomes a 400/413 problem, never a 500.

- `StrictJSONParser`: the size limit of `LimitedJSONParser`, plus duplicate keys refused (two
  parsers reading `{"max_parallel": 1, "max_parallel": 9}` differently is how a proxy's check
  and the server's reading diverge), deep nesting refused (Python's decoder would raise
  RecursionError, a 500) and items counted while parsing (`jsondecode`: 413 at the first item
  past BATCH_MAX_ITEMS_PER_BATCH, before millions of tiny items are built).
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

from batch.api import jsondecode
from batch.api.exceptions import PayloadTooLarge
from batch.api.parsers import LimitedJSONParser

FORM_ONLY_FIELDS = frozenset({"csrfmiddlewaretoken"})  # the browsable API's HTML forms


class _StrictDecoding(JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.getreader(encoding)(stream).read()
        except ValueError as exc:  # not UTF-8 (the charset middleware let nothing else through)
            raise ParseError(f"JSON parse error - {exc}") from None
        return decode_json(text)


def decode_json(text: str) -> Any:
    """Strict JSON; 413 for an array past BATCH_MAX_ITEMS_PER_BATCH, counted while parsing."""
    limit = settings.BATCH_MAX_ITEMS_PER_BATCH
    try:
        return jsondecode.loads(text, max_elements=limit)
    except jsondecode.TooManyElements as exc:
        message = f"A batch may hold at most {limit} items; the body has more."
        raise PayloadTooLarge(message, errors={exc.field or "items": [message]}) from None
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
