"""Signed checkpoints of the audit log: a key outside the database signs (length, head hash,
time). Kept outside the database, a checkpoint detects any rewrite of the rows it covers, even
one that recomputes every hash of the chain (which the chain alone cannot see)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from revreg.artifacts.canonical import canonical_json, strict_loads
from revreg.artifacts.dsse import Envelope, sign, verify
from revreg.artifacts.keys import Signer, TrustedKey
from revreg.errors import CheckFailed, FormatError, InputError
from revreg.registry.api import AuditEntryInfo

PAYLOAD_TYPE = "application/vnd.revreg.audit-checkpoint+json"
SCHEMA = "revreg.audit-checkpoint/v1"


@dataclass(frozen=True)
class Checkpoint:
    registry: str
    length: int  # rows 1..length are covered
    head: str  # the hash of row `length`
    time: str
    signer: TrustedKey | None = None


def make_checkpoint(entries: Sequence[AuditEntryInfo], registry: str, time: str, signer: Signer) -> bytes:
    """Sign the current head of an (already verified) chain."""
    if not entries:
        raise InputError("the audit log is empty: nothing to checkpoint yet")
    last = entries[-1]
    payload = canonical_json(
        {"schema": SCHEMA, "registry": registry, "length": last.seq, "head": last.hash, "time": time}
    )
    return sign(payload, PAYLOAD_TYPE, signer).to_json()


def read_checkpoint(envelope: bytes | str, trusted: Mapping[str, TrustedKey]) -> Checkpoint:
    verified = verify(Envelope.from_json(envelope), PAYLOAD_TYPE, trusted)
    doc = strict_loads(verified.payload, "audit checkpoint")
    if (
        not isinstance(doc, dict)
        or doc.get("schema") != SCHEMA
        or set(doc)
        != {
            "schema",
            "registry",
            "length",
            "head",
            "time",
        }
    ):
        raise FormatError(f"not a {SCHEMA} document")
    length, head = doc["length"], doc["head"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1 or not isinstance(head, str):
        raise FormatError("audit checkpoint: length must be a positive integer and head a hash")
    return Checkpoint(str(doc["registry"]), length, head, str(doc["time"]), verified.key)


def check_against(checkpoint: Checkpoint, entries: Sequence[AuditEntryInfo]) -> None:
    """Raise CheckFailed unless the log still holds, at row `length`, the head that was signed.
    With the chain intact, that head commits to every earlier row."""
    by_seq = {e.seq: e for e in entries}
    row = by_seq.get(checkpoint.length)
    if row is None:
        last = entries[-1].seq if entries else 0
        raise CheckFailed(
            f"the audit log ends at row {last}, but the checkpoint of {checkpoint.time} covers "
            f"{checkpoint.length} rows: rows were deleted"
        )
    if row.hash != checkpoint.head:
        raise CheckFailed(
            f"row {checkpoint.length} hashes to {row.hash[:16]}…, the checkpoint of {checkpoint.time} signed "
            f"{checkpoint.head[:16]}…: the log was rewritten up to there"
        )
