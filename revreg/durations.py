"""Durations written as a number and a unit (30d, 12h, 90m, 3600s), for policies and tokens."""

from __future__ import annotations

import re
from datetime import timedelta

from revreg.errors import InputError

_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str, what: str) -> timedelta:
    """`what` names the setting in errors, e.g. "policy rule max_age" or "--expires"."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise InputError(f"{what} must look like 30d, 12h, 90m or 3600s, got {text!r}")
    try:
        return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    except OverflowError as exc:
        raise InputError(f"{what} {text!r} is too large") from exc
