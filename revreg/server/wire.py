"""The JSON shapes the server sends and the client reads back into the registry's dataclasses."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from revreg.registry.audit import AuditEntryInfo, ChainVerdict
from revreg.registry.service import (
    BaseInfo,
    CertificationInfo,
    FsckReport,
    KeyRecord,
    ProbeSetInfo,
    VersionDetail,
    VersionInfo,
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump(obj: Any) -> Any:
    """A registry dataclass (or list of them) as JSON values."""
    if isinstance(obj, list):
        return [dump(o) for o in obj]
    return _plain(asdict(obj))


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def version_info(d: dict[str, Any]) -> VersionInfo:
    return VersionInfo(**{**d, "pushed_at": _dt(d["pushed_at"]), "tags": tuple(d["tags"])})


def version_detail(d: dict[str, Any]) -> VersionDetail:
    return VersionDetail(
        info=version_info(d["info"]),
        manifest=d["manifest"],
        certifications=tuple(
            CertificationInfo(**{**c, "created_at": _dt(c["created_at"])}) for c in d["certifications"]
        ),
        history=tuple(AuditEntryInfo(**h) for h in d["history"]),
        base_registered=d["base_registered"],
    )


def key_record(d: dict[str, Any]) -> KeyRecord:
    return KeyRecord(**{**d, "added_at": _dt(d["added_at"])})


def base_info(d: dict[str, Any]) -> BaseInfo:
    return BaseInfo(**d)


def probe_set_info(d: dict[str, Any]) -> ProbeSetInfo:
    return ProbeSetInfo(**{**d, "created_at": _dt(d["created_at"])})


def chain_verdict(d: dict[str, Any]) -> ChainVerdict:
    return ChainVerdict(**d)


def audit_entry(d: dict[str, Any]) -> AuditEntryInfo:
    return AuditEntryInfo(**d)


def fsck_report(d: dict[str, Any]) -> FsckReport:
    return FsckReport(d["blobs_checked"], d["versions_checked"], tuple(d["problems"]), tuple(d["warnings"]))
