"""Canonical JSON: the one byte encoding of a JSON value that revreg signs and hashes."""

from __future__ import annotations

import json
from typing import Any

from revreg.errors import FormatError


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8, no NaN or infinities."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise FormatError(f"JSON constant {name} is not allowed")


MAX_INT_DIGITS = 64


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise FormatError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    # Python refuses ints over 4,300 digits with a bare ValueError; nothing revreg reads needs 64.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise FormatError(f"integer with {len(text)} digits is out of range")
    return int(text)


def _no_surrogates(value: Any) -> None:
    """JSON escapes can spell lone surrogates (\\ud800), which no UTF-8 text can hold."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise FormatError("string with a lone surrogate code point (not valid Unicode text)") from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def strict_loads(data: bytes | str, what: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity, numbers that overflow to infinity and
    integers of absurd length; errors name `what`."""
    try:
        doc = json.loads(
            data,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
        _no_surrogates(doc)
        return doc
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON ({exc})") from exc
