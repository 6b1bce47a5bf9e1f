"""The append-only audit log: each row carries the hash of the previous one, so an edited,
deleted or reordered row breaks the chain at a place `verify` can name."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from revreg.artifacts.canonical import canonical_json
from revreg.registry.api import AuditEntryInfo, ChainVerdict
from revreg.registry.chain import GENESIS, entry_hash
from revreg.registry.models import AuditEntry, Setting

HEAD_KEY = "audit_head"
# Arbitrary constant naming revreg's audit lock among PostgreSQL advisory locks.
_PG_LOCK = 0x7265_7672


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def append(session: Session, actor: str, action: str, subject: str, details: dict[str, Any]) -> AuditEntry:
    """Append one row in the caller's transaction (so it commits or rolls back with the change)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
    last = session.scalars(select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(1)).first()
    seq = (last.seq + 1) if last else 1
    prev = last.hash if last else GENESIS
    at = now_iso()
    details_text = canonical_json(details).decode("utf-8")
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        details=details_text,
        prev_hash=prev,
        hash=entry_hash(prev, seq, at, actor, action, subject, details_text),
    )
    session.add(entry)
    head = session.get(Setting, HEAD_KEY)
    if head is None:
        session.add(Setting(key=HEAD_KEY, value=f"{seq}:{entry.hash}"))
    else:
        head.value = f"{seq}:{entry.hash}"
    return entry


def info(entry: AuditEntry) -> AuditEntryInfo:
    return AuditEntryInfo(
        entry.seq, entry.at, entry.actor, entry.action, entry.subject, json.loads(entry.details), entry.hash
    )


def verify(session: Session) -> ChainVerdict:
    """Walk the chain in sequence order and name the first row that does not fit."""
    prev, expected_seq, count = GENESIS, 1, 0
    for e in session.scalars(select(AuditEntry).order_by(AuditEntry.seq)):
        count += 1
        if e.seq != expected_seq:
            return ChainVerdict(False, count, f"row {expected_seq} is missing (deleted); the next row is {e.seq}")
        if e.prev_hash != prev:
            return ChainVerdict(False, count, f"row {e.seq} does not follow row {e.seq - 1} (reordered or replaced)")
        if entry_hash(e.prev_hash, e.seq, e.at, e.actor, e.action, e.subject, e.details) != e.hash:
            return ChainVerdict(False, count, f"row {e.seq} ({e.action} {e.subject}) was edited after it was written")
        prev, expected_seq = e.hash, expected_seq + 1
    head = session.get(Setting, HEAD_KEY)
    recorded = head.value if head else None
    actual = f"{expected_seq - 1}:{prev}" if count else None
    if recorded != actual:
        return ChainVerdict(
            False,
            count,
            f"the log ends at row {expected_seq - 1} but its head records {recorded} (rows deleted from the end)",
        )
    return ChainVerdict(True, count, None)
