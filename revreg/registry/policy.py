"""Publish gates: what a version needs before `publish` (and `pull` of a published version).

A gate is a small object with `verify(...)` that raises or returns the evidence it accepted.
The default asks for a passing certification signed by a trusted, unrevoked verifier key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from revreg.artifacts.attestation import Certification, verify_certification
from revreg.artifacts.keys import TrustedKey
from revreg.errors import RevregError
from revreg.registry.api import GateError

__all__ = ["GateError", "PublishGate", "RequirePassingCertification"]


class PublishGate(Protocol):
    def verify(
        self, subject: str, digest: str, envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey]
    ) -> Certification: ...


class RequirePassingCertification:
    """At least one certification of exactly this digest, verdict PASS, by a trusted verifier."""

    def verify(
        self, subject: str, digest: str, envelopes: Sequence[str], verifiers: Mapping[str, TrustedKey]
    ) -> Certification:
        reasons = []
        for envelope in envelopes:
            try:
                cert = verify_certification(envelope, verifiers)
            except RevregError as exc:
                reasons.append(str(exc))
                continue
            if cert.subject_digest != digest:
                reasons.append("a certification is about another digest")
            elif not cert.passed:
                reasons.append(f"certification by {cert.verifier.name} says {cert.verdict}")
            else:
                return cert
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        raise GateError(f"{subject} has no passing certification by a trusted verifier key{detail}")
