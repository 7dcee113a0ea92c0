"""Strict JSON decoding that counts array elements while it parses.

`json.loads` builds the whole document before anything can count it: 63 MiB of `{}` items
became 22 million dicts (2.4 GB) before the item limit was checked. Here the top-level
object's arrays (and a top-level array) are parsed element by element with the C scanner,
and parsing stops at the first element past `max_elements`. Everything else is as strict as
before: no duplicate keys, no NaN/Infinity.
"""

from __future__ import annotations

import re
from json import JSONDecoder
from json.decoder import scanstring  # type: ignore[attr-defined]  # the C scanner's, not in typeshed
from typing import Any

from rest_framework.utils import json

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class TooManyElements(ValueError):
    """An array holds more than `limit` elements; `field` names it ("" for a top-level array)."""

    def __init__(self, field: str, limit: int) -> None:
        super().__init__(f"more than {limit} elements in {field or 'the array'}")
        self.field, self.limit = field, limit


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:100]!r}")
            seen.add(key)
    return result


def loads(text: str, *, max_elements: int) -> Any:
    """Decode `text`; raises ValueError (TooManyElements past the bound) or RecursionError."""
    decoder = _Bounded(text, max_elements)
    value, end = decoder.top_level(_skip(text, 0))
    if _skip(text, end) != len(text):
        raise ValueError(f"Extra data: char {end}")
    return value


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


class _Bounded:
    def __init__(self, text: str, max_elements: int) -> None:
        self.text, self.max_elements = text, max_elements
        decoder = JSONDecoder(parse_constant=json.strict_constant, object_pairs_hook=unique_keys)
        self.scan_once = decoder.scan_once  # type: ignore[attr-defined]  # the C scanner, as json.loads uses

    def value(self, index: int) -> tuple[Any, int]:
        try:
            return self.scan_once(self.text, index)  # type: ignore[no-any-return]
        except StopIteration as stop:
            raise ValueError(f"Expecting value: char {stop.value}") from None

    def top_level(self, index: int) -> tuple[Any, int]:
        char = self.text[index : index + 1]
        if char == "{":
            return self.object(index)
        if char == "[":
            return self.array(index, "")
        return self.value(index)

    def expect(self, index: int, chars: str) -> str:
        char = self.text[index : index + 1]
        if not char or char not in chars:
            raise ValueError(f"Expecting one of {chars!r}: char {index}")
        return char

    def object(self, index: int) -> tuple[dict[str, Any], int]:
        pairs: list[tuple[str, Any]] = []
        index = _skip(self.text, index + 1)
        if self.text[index : index + 1] == "}":
            return {}, index + 1
        while True:
            self.expect(index, '"')
            key, index = scanstring(self.text, index + 1)
            index = _skip(self.text, index)
            self.expect(index, ":")
            index = _skip(self.text, index + 1)
            if self.text[index : index + 1] == "[":
                value, index = self.array(index, key)
            else:
                value, index = self.value(index)
            pairs.append((key, value))
            index = _skip(self.text, index)
            if self.expect(index, ",}") == "}":
                return unique_keys(pairs), index + 1
            index = _skip(self.text, index + 1)

    def array(self, index: int, field: str) -> tuple[list[Any], int]:
        values: list[Any] = []
        index = _skip(self.text, index + 1)
        if self.text[index : index + 1] == "]":
            return values, index + 1
        while True:
            if len(values) >= self.max_elements:
                raise TooManyElements(field, self.max_elements)
            value, index = self.value(index)
            values.append(value)
            index = _skip(self.text, index)
            if self.expect(index, ",]") == "]":
                return values, index + 1
            index = _skip(self.text, index + 1)
