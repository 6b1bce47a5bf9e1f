"""Gather a version's evidence from the registry and run a policy over it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from revreg.gate.policy import AllOf, CertificationEvidence, Evidence, KeyFacts, RuleResult
from revreg.registry.api import RegistryAPI
from revreg.registry.policy import newest_index


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
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        return fallback


def evaluate(registry: RegistryAPI, ref: str, policy: AllOf, now: datetime | None = None) -> GateReport:
    now = now or datetime.now(UTC)
    detail = registry.show(ref)
    v = detail.info
    keys = {(k.keyid, k.role): k for k in registry.key_records()}
    signer_key = keys.get((v.signer_keyid, "publisher"))
    signer = KeyFacts(v.signer_keyid, v.signer_name, v.signer_revoked or bool(signer_key and signer_key.revoked))
    # Only unrevoked verifier keys give evidence; of their certifications of this digest, the
    # newest decides (an older PASS never outweighs a newer FAIL).
    verifiers = registry.trusted("verifier")
    rows = detail.certifications  # in record order
    found = newest_index([row.envelope for row in rows], verifiers, v.digest)
    evidence = None
    if found is not None:
        index, current = found
        row = rows[index]
        record = keys.get((current.verifier.keyid, "verifier"))
        facts = KeyFacts(current.verifier.keyid, current.verifier.name, bool(record and record.revoked))
        evidence = CertificationEvidence(current.predicate, facts, _when(current.finished_at, row.created_at))
    # Certifications set aside because their verifier is revoked are named, never counted.
    # Each row records the key that signed it, checked when it was recorded.
    signed_by = {row.verifier_keyid for row in rows}
    revoked = tuple(
        KeyFacts(k.keyid, k.name, True)
        for (keyid, role), k in keys.items()
        if role == "verifier" and k.revoked and keyid in signed_by
    )
    results = policy.verify(Evidence(v.ref, v.digest, v.state, signer, evidence, now, revoked))
    accepted = evidence
    return GateReport(v.ref, v.digest, all(r.passed for r in results), results, accepted)
