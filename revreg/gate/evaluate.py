"""Gather a version's evidence from the registry and run a policy over it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from revreg.artifacts.attestation import verify_certification
from revreg.errors import RevregError
from revreg.gate.policy import AllOf, CertificationEvidence, Evidence, KeyFacts, RuleResult
from revreg.registry.api import RegistryAPI


@dataclass(frozen=True)
class GateReport:
    ref: str
    digest: str
    passed: bool
    results: list[RuleResult]
    certification: CertificationEvidence | None

    def to_dict(self) -> dict[str, Any]:
        cert = self.certification
        return {
            "ref": self.ref,
            "digest": self.digest,
            "passed": self.passed,
            "rules": [r.__dict__ for r in self.results],
            "certification": None
            if cert is None
            else {
                "verifier": cert.verifier.__dict__,
                "certified_at": cert.certified_at.isoformat(),
                "verdict": cert.predicate.get("verdict"),
                "device": cert.predicate.get("device"),
                "rf": (cert.predicate.get("metrics") or {}).get("rf"),
            },
        }


def _when(text: Any, fallback: datetime) -> datetime:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return fallback


def evaluate(registry: RegistryAPI, ref: str, policy: AllOf, now: datetime | None = None) -> GateReport:
    now = now or datetime.now(UTC)
    detail = registry.show(ref)
    v = detail.info
    keys = {(k.keyid, k.role): k for k in registry.key_records()}
    signer_key = keys.get((v.signer_keyid, "publisher"))
    signer = KeyFacts(v.signer_keyid, v.signer_name, v.signer_revoked or bool(signer_key and signer_key.revoked))
    verifiers = registry.trusted("verifier", include_revoked=True)
    candidates: list[CertificationEvidence] = []
    for row in sorted(detail.certifications, key=lambda c: c.created_at, reverse=True):
        try:
            cert = verify_certification(row.envelope, verifiers)
        except RevregError:
            continue  # not by a verifier key this registry knows: not evidence
        if cert.subject_digest != v.digest:
            continue
        record = keys.get((cert.verifier.keyid, "verifier"))
        facts = KeyFacts(cert.verifier.keyid, cert.verifier.name, bool(record and record.revoked))
        candidates.append(
            CertificationEvidence(cert.predicate, facts, _when(cert.predicate.get("finished_at"), row.created_at))
        )
    chosen: tuple[list[RuleResult], CertificationEvidence | None] | None = None
    for evidence in candidates:
        results = policy.verify(Evidence(v.ref, v.digest, v.state, signer, evidence, now))
        if all(r.passed for r in results):
            chosen = (results, evidence)
            break
        chosen = chosen or (results, evidence)
    if chosen is None:
        chosen = (policy.verify(Evidence(v.ref, v.digest, v.state, signer, None, now)), None)
    results, accepted = chosen
    return GateReport(v.ref, v.digest, all(r.passed for r in results), results, accepted)
