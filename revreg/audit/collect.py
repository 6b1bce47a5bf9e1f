"""Gather a registry's state into one plain dictionary: the report's single source of truth.

Every list is sorted and every value is JSON, so the same registry state gives the same
report bytes once the generation time is pinned.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from revreg.artifacts.attestation import verify_certification
from revreg.artifacts.predicate import metric, metric_names
from revreg.errors import RevregError
from revreg.registry.api import RegistryAPI


def _certification(envelope: str, verifiers: dict[str, Any], digest: str, recorded: str) -> dict[str, Any]:
    try:
        cert = verify_certification(envelope, verifiers)
    except RevregError as exc:
        return {"verified": False, "error": str(exc), "recorded_at": recorded}
    p = cert.predicate
    metrics = p.get("metrics") or {}
    divergence = metrics.get("divergence")
    primary, secondary = metric_names(divergence)
    baselines = [
        {
            "baseline": b.get("baseline"),
            "reset": b.get("reset"),
            "refused": b.get("refused"),
            "rf": b.get("rf"),
            f"{primary}_reset": metric(b, "reset", divergence=divergence)[1],
            **{
                k: b.get(k)
                for k in (
                    "max_abs_reset",
                    "weights_bitwise_after_subtract",
                    "weight_elements_changed",
                    "leakage_per_probe",
                )
            },
        }
        for b in p.get("baselines") or []
    ]
    return {
        "verified": True,
        "about_this_digest": cert.subject_digest == digest,
        "verifier": {"name": cert.verifier.name, "keyid": cert.verifier.keyid},
        "verdict": cert.verdict,
        "reasons": p.get("reasons") or [],
        "recorded_at": recorded,
        "finished_at": p.get("finished_at"),
        "device": p.get("device"),
        "cycles": p.get("cycles"),
        "bitwise": p.get("bitwise"),
        "rf": metrics.get("rf"),
        "schema_version": p.get("schema_version", 1),
        "metric_names": [primary, secondary],
        **{
            f"{name}_{phase}": metric(metrics, phase, secondary=second)[1]
            for phase in ("adapted", "reset")
            for name, second in ((primary, False), (secondary, True))
        },
        "max_abs_reset": metrics.get("max_abs_reset"),
        "non_finite": p.get("non_finite") or {},
        "divergence": divergence,
        "probes": p.get("probes"),
        "leakage": p.get("leakage"),
        "environment": p.get("environment"),
        "baselines": baselines,
    }


def collect(registry: RegistryAPI, behavior: str | None = None, generated_at: str = "") -> dict[str, Any]:
    versions = registry.ls(behavior)
    verifiers = registry.trusted("verifier", include_revoked=True)
    keys = registry.key_records()
    chain = registry.audit_verify()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        detail = registry.show(f"{v.name}@{v.digest}")
        by_name.setdefault(v.name, []).append(
            {
                "version": v.version,
                "digest": v.digest,
                "size": v.size,
                "state": v.state,
                "yank_reason": v.yank_reason,
                "tags": list(v.tags),
                "signer": {"name": v.signer_name, "keyid": v.signer_keyid, "revoked": v.signer_revoked},
                "base": {"identity": v.base_identity, "registered": detail.base_registered},
                "pushed_at": v.pushed_at.isoformat(),
                "pushed_by": v.pushed_by,
                "description": detail.manifest.get("description", ""),
                "attachments": [f"{a['kind']} {a['target']}" for a in detail.manifest.get("attachments", [])],
                "timeline": [
                    {"seq": e.seq, "at": e.at, "action": e.action, "actor": e.actor, "details": e.details}
                    for e in detail.history
                ],
                "certifications": [
                    _certification(c.envelope, verifiers, v.digest, c.created_at.isoformat())
                    for c in detail.certifications
                ],
            }
        )
    states = Counter(v.state for v in versions)
    return {
        "schema": "revreg.audit-report/v1",
        "generated_at": generated_at,
        "registry": registry.describe(),
        "scope": behavior or "all behaviors",
        "summary": {
            "behaviors": len(by_name),
            "versions": len(versions),
            "states": dict(sorted(states.items())),
            "certifications": sum(len(v["certifications"]) for vs in by_name.values() for v in vs),
            "bases": len(registry.bases()),
            "probe_sets": len(registry.probe_sets()),
            "keys": len(keys),
        },
        "audit_chain": {"ok": chain.ok, "rows": chain.rows, "problem": chain.problem},
        "keys": [
            {
                "name": k.name,
                "keyid": k.keyid,
                "role": k.role,
                "revoked": k.revoked,
                "revoked_reason": k.revoked_reason,
                "added_at": k.added_at.isoformat(),
            }
            for k in sorted(keys, key=lambda k: (k.name, k.role, k.keyid))
        ],
        "behaviors": [{"name": n, "versions": vs} for n, vs in sorted(by_name.items())],
    }
