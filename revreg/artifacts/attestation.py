"""Certifications: in-toto Statement v1 about one artifact digest, in a DSSE envelope signed by
a verifier key. The predicate's content is the verifier's; here only its frame is checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from revreg.artifacts.canonical import canonical_json, strict_loads
from revreg.artifacts.dsse import Envelope, sign, verify
from revreg.artifacts.keys import Signer, TrustedKey
from revreg.errors import FormatError

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://revreg.dev/certification/v2"  # what is signed now (predicate schema 2)
# Every predicate type ever signed: certifications already recorded keep verifying.
PREDICATE_TYPES = ("https://revreg.dev/certification/v1", PREDICATE_TYPE)
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


@dataclass(frozen=True)
class Certification:
    subject_name: str
    subject_digest: str  # "sha256:<hex>", the artifact file's digest
    verdict: str
    predicate: dict[str, Any]
    verifier: TrustedKey

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def finished_at(self) -> str:
        """When the verifier finished (its own signed UTC timestamp; "" if it did not say):
        the order in which a version's verdicts supersede each other."""
        value = self.predicate.get("finished_at")
        return value if isinstance(value, str) else ""


def _ran(predicate: Mapping[str, Any]) -> object:
    behavior = predicate.get("behavior")
    return behavior.get("digest") if isinstance(behavior, Mapping) else None


def check_consistent(subject_digest: str, predicate: Mapping[str, Any]) -> None:
    """A statement is evidence about its subject only if its predicate says the verifier ran
    exactly that artifact (sigstore's rule: recompute the subject from the predicate)."""
    ran = _ran(predicate)
    if ran != subject_digest:
        raise FormatError(
            f"certification statement is about {subject_digest} but its predicate says the verifier ran "
            f"{ran if ran is not None else 'nothing it names'}; it is not evidence about either"
        )


def statement(subject_name: str, subject_digest: str, predicate: Mapping[str, Any]) -> bytes:
    algo, _, hexpart = subject_digest.partition(":")
    return canonical_json(
        {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": subject_name, "digest": {algo: hexpart}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": dict(predicate),
        }
    )


def sign_certification(subject_name: str, subject_digest: str, predicate: Mapping[str, Any], signer: Signer) -> bytes:
    if predicate.get("verdict") not in VERDICTS:
        raise FormatError(f"certification predicate needs a verdict among {', '.join(VERDICTS)}")
    check_consistent(subject_digest, predicate)
    return sign(statement(subject_name, subject_digest, predicate), PAYLOAD_TYPE, signer).to_json()


def verify_certification(envelope_json: bytes | str, trusted_verifiers: Mapping[str, TrustedKey]) -> Certification:
    """Verify the signature by a trusted verifier key, then parse the statement frame."""
    verified = verify(Envelope.from_json(envelope_json), PAYLOAD_TYPE, trusted_verifiers)
    doc = strict_loads(verified.payload, "certification statement")
    try:
        if doc["_type"] != STATEMENT_TYPE or doc["predicateType"] not in PREDICATE_TYPES:
            raise FormatError("not a revreg certification statement")
        (subject,) = doc["subject"]
        ((algo, hexpart),) = subject["digest"].items()
        predicate = doc["predicate"]
        verdict = predicate["verdict"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"malformed certification statement ({exc!r})") from exc
    if verdict not in VERDICTS:
        raise FormatError(f"certification verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if not isinstance(predicate, dict):
        raise FormatError("certification predicate is not a JSON object")
    check_consistent(f"{algo}:{hexpart}", predicate)
    return Certification(subject["name"], f"{algo}:{hexpart}", verdict, predicate, verified.key)
