"""The audit log's hash chain, as pure functions: what the database computes when it appends,
and what a client recomputes from the rows it is given (so a checkpoint can be checked over
HTTP without trusting the server's own verdict)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from revreg.artifacts.canonical import canonical_json
from revreg.registry.api import AuditEntryInfo

GENESIS = "0" * 64


def entry_hash(prev_hash: str, seq: int, at: str, actor: str, action: str, subject: str, details: str) -> str:
    body = canonical_json(
        {"seq": seq, "at": at, "actor": actor, "action": action, "subject": subject, "details": details}
    )
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def recompute(entries: Sequence[AuditEntryInfo]) -> str | None:
    """None if `entries` (rows 1..n in order) chain up, else the first row that does not. Details
    are stored as canonical JSON, so re-encoding the parsed ones gives the hashed text back."""
    prev = GENESIS
    for expected, e in enumerate(entries, 1):
        if e.seq != expected:
            return f"row {expected} is missing; the next row is {e.seq}"
        details = canonical_json(e.details).decode("utf-8")
        if entry_hash(prev, e.seq, e.at, e.actor, e.action, e.subject, details) != e.hash:
            return f"row {e.seq} ({e.action} {e.subject}) does not hash to what the chain records"
        prev = e.hash
    return None
