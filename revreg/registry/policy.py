"""Publish gates: what a version needs before `publish` (and `pull` of a published version).

A gate is a small object with `verify(...)` that raises or returns the evidence it accepted.
The default asks for a passing certification signed by a trusted, unrevoked verifier key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from revreg.artifacts.attestation import Certification, verify_certification
from revreg.artifacts.keys import TrustedKey
from revreg.errors import RevregError
from revreg.registry.api import GateError

__all__ = [
    "EPOCH",
    "GateError",
    "PublishGate",
    "RequirePassingCertification",
    "newest",
    "newest_index",
    "signed_time",
    "statement_key",
]


class PublishGate(Protocol):
    def verify(
        self, subject: str, digest: str, envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey]
    ) -> Certification: ...


EPOCH = datetime.min.replace(tzinfo=UTC)


def signed_time(cert: Certification) -> datetime:
    """The verifier's signed finish time, in UTC; one that is missing, malformed or out of range
    sorts first (and is refused when recorded)."""
    try:
        when = datetime.fromisoformat(cert.finished_at.replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        return EPOCH


def statement_key(envelope: str) -> tuple[bytes, tuple[str, ...]]:
    """What a certification says and who said it, however the envelope is spelled."""
    from revreg.artifacts.dsse import Envelope

    try:
        parsed = Envelope.from_json(envelope)
    except RevregError:
        return (envelope.encode("utf-8", "replace"), ())
    return parsed.payload, tuple(sorted(s.keyid for s in parsed.signatures))


def newest_index(
    envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey], digest: str
) -> tuple[int, Certification] | None:
    """The version's current verdict and its place in `envelopes` (record order): of the
    certifications of exactly `digest` by one of `verifiers` (others are not evidence), the one the
    verifier finished last; on a tie a verdict other than PASS wins (fail closed), then the later record."""
    best: tuple[tuple[datetime, bool, int], int, Certification] | None = None
    for index, envelope in enumerate(envelopes):
        try:
            cert = verify_certification(envelope, verifiers)
        except RevregError:
            continue
        if cert.subject_digest != digest:
            continue
        # Ties in time go to a verdict that is not PASS (fail closed), then to the later record.
        key = (signed_time(cert), not cert.passed, index)
        if best is None or key >= best[0]:
            best = (key, index, cert)
    return (best[1], best[2]) if best else None


def newest(envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey], digest: str) -> Certification | None:
    found = newest_index(envelopes, verifiers, digest)
    return found[1] if found else None


class RequirePassingCertification:
    """The newest certification of exactly this digest by a trusted, unrevoked verifier says PASS.
    An older PASS never outweighs a newer FAIL."""

    def verify(
        self, subject: str, digest: str, envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey]
    ) -> Certification:
        current = newest(envelopes, verifiers, digest)
        if current is None:
            raise GateError(f"{subject} has no certification by a trusted verifier key")
        if not current.passed:
            raise GateError(
                f"{subject}: its newest certification, by {current.verifier.name} "
                f"(finished {current.finished_at or 'at an unknown time'}), says {current.verdict}; "
                "run a new certification"
            )
        return current
