"""The certification predicate's schema versions, and reading its divergence metrics in any of
them (pure: the gate and the audit read predicates without torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# 1: metrics stored as kl_*/js_* whatever the probe set's divergence (for `mse` probe sets they
#    held MSE and cosine distance). 2: named by their divergence; schema_version recorded.
SCHEMA_VERSION = 2

# What each probe-set divergence measures, as (primary, secondary) metric names.
METRIC_NAMES: dict[str, tuple[str, str]] = {"kl": ("kl", "js"), "mse": ("mse", "cosine")}


def metric_names(divergence: object) -> tuple[str, str]:
    return METRIC_NAMES.get(divergence if isinstance(divergence, str) else "kl", METRIC_NAMES["kl"])


def metric(
    metrics: Mapping[str, Any], phase: str, secondary: bool = False, divergence: object = None
) -> tuple[str, Any]:
    """(name, value) of the primary (or secondary) divergence for `phase` ("adapted" or "reset")
    in a predicate's metrics or one of its baselines, whichever schema wrote it."""
    names = metric_names(divergence if divergence is not None else metrics.get("divergence"))
    name = names[1 if secondary else 0]
    key = f"{name}_{phase}"
    if key in metrics:
        return name, metrics[key]
    return name, metrics.get(f"{'js' if secondary else 'kl'}_{phase}")  # schema 1
