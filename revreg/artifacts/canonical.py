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


def strict_loads(data: bytes | str, what: str) -> Any:
    """Parse JSON refusing duplicate keys and NaN/Infinity; errors name `what`."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON ({exc})") from exc
