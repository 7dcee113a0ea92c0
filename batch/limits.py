"""Input limits every way in (API, admin, commands) shares: `services.submit_batch` applies them.

PostgreSQL refuses NUL characters in `text` and `jsonb`; without these checks a NUL would
reach the INSERT and end as a database error (a 500) instead of a 400 naming the field.
Lone surrogates (`"\ud800"`) pass `json.loads` but are not Unicode text: PostgreSQL refuses
them, and SQLite stores them and then every read of the row fails to encode (a 500).
"""

from __future__ import annotations

import json

from django.conf import settings

MAX_NAME_LENGTH = 200
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def string_problem(value: str) -> str | None:
    """Why a string cannot be stored (NUL, lone surrogate), or None."""
    if "\x00" in value:
        return "NUL characters are not allowed."
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "Lone surrogates (\\ud800-\\udfff) are not allowed: not valid Unicode text."
    return None


def text_problem(value: object, *, max_length: int) -> str | None:
    """Why a free-text field (name, key) is refused, or None if it is fine."""
    if not isinstance(value, str):
        return "Must be a string."
    if (problem := string_problem(value)) is not None:
        return problem
    if len(value) > max_length:
        return f"At most {max_length} characters; got {len(value)}."
    return None


def params_problem(params: object) -> str | None:
    """Why one item's parameters are refused (NUL, surrogates, nesting, size), or None if fine."""
    depth_limit = settings.BATCH_MAX_ITEM_PARAMS_DEPTH
    stack: list[tuple[object, int]] = [(params, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if (problem := string_problem(value)) is not None:
                return problem
        elif isinstance(value, dict | list):
            if depth > depth_limit:
                return f"Nested deeper than {depth_limit} levels."
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return _size_problem(params)


def _size_problem(params: object) -> str | None:
    limit = settings.BATCH_MAX_ITEM_PARAMS_BYTES
    try:
        size = len(json.dumps(params, allow_nan=False).encode())
    except (TypeError, ValueError):
        return "Must be JSON (no NaN or Infinity)."
    if size > limit:
        return f"At most {limit} bytes of JSON per item; got {size}."
    return None
