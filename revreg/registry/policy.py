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

__all__ = ["GateError", "PublishGate", "RequirePassingCertification", "newest", "newest_index", "signed_time"]


class PublishGate(Protocol):
    def verify(
        self, subject: str, digest: str, envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey]
    ) -> Certification: ...


def signed_time(cert: Certification) -> datetime:
    """The verifier's signed finish time; a certification that does not say sorts first."""
    try:
        when = datetime.fromisoformat(cert.finished_at.replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def newest_index(
    envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey], digest: str
) -> tuple[int, Certification] | None:
    """The version's current verdict and its place in `envelopes` (record order): of the
    certifications of exactly `digest` by one of `verifiers` (others are not evidence), the one the
    verifier finished last; ties go to the one recorded last."""
    best: tuple[datetime, int, Certification] | None = None
    for index, envelope in enumerate(envelopes):
        try:
            cert = verify_certification(envelope, verifiers)
        except RevregError:
            continue
        if cert.subject_digest != digest:
            continue
        if best is None or (signed_time(cert), index) >= best[:2]:
            best = (signed_time(cert), index, cert)
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
