"""DSSE envelopes (secure-systems-lab/dsse v1.0): PAE, signing with Ed25519, verification.

Verification returns the verified payload and the key that signed it; it never returns a bool.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from revreg.artifacts.canonical import canonical_json, strict_loads
from revreg.artifacts.keys import PublicKey, Signer, TrustedKey
from revreg.errors import FormatError, SignatureError, UnknownKeyError


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        return canonical_json(
            {
                "payload": base64.b64encode(self.payload).decode(),
                "payloadType": self.payload_type,
                "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures],
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str, *, canonical: bool = True) -> Envelope:
        """Parse an envelope. By default it must be in revreg's one canonical form, byte for byte:
        the three DSSE fields and nothing else, exactly one signature with `keyid` and `sig`,
        standard base64 with canonical padding bits, canonical JSON. So no two different strings
        verify as the same signed envelope (nothing to re-wrap, no "free" bits to flip).
        `canonical=False` reads foreign DSSE envelopes as the spec allows (URL-safe base64,
        several signatures, any JSON layout); revreg never accepts evidence that way."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        doc = strict_loads(raw, "DSSE envelope")
        if not isinstance(doc, dict):
            raise FormatError("DSSE envelope is not a JSON object")
        try:
            payload = _b64(doc["payload"], strict=canonical)
            payload_type = doc["payloadType"]
            raw_sigs = doc["signatures"]
            if not isinstance(payload_type, str) or not isinstance(raw_sigs, list) or not raw_sigs:
                raise TypeError("payloadType must be a string and signatures a non-empty list")
            if not all(isinstance(s, dict) for s in raw_sigs):
                raise TypeError("each signature must be an object")
            signatures = tuple(Signature(str(s.get("keyid", "")), _b64(s["sig"], strict=canonical)) for s in raw_sigs)
        except (KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"malformed DSSE envelope ({exc})") from exc
        envelope = cls(payload, payload_type, signatures)
        if canonical:
            if set(doc) != ENVELOPE_FIELDS:
                raise FormatError(f"DSSE envelope has unknown fields {sorted(set(doc) - ENVELOPE_FIELDS)}")
            if len(raw_sigs) != 1:
                raise FormatError(f"a revreg envelope carries exactly one signature, not {len(raw_sigs)}")
            if set(raw_sigs[0]) != SIGNATURE_FIELDS or not isinstance(raw_sigs[0]["keyid"], str):
                raise FormatError("a revreg envelope signature has exactly the fields keyid (a string) and sig")
            if envelope.to_json() != raw:
                raise FormatError("DSSE envelope is not in canonical form (sorted keys, no whitespace)")
        return envelope


ENVELOPE_FIELDS = frozenset({"payload", "payloadType", "signatures"})
SIGNATURE_FIELDS = frozenset({"keyid", "sig"})


def _b64(text: object, strict: bool) -> bytes:
    if not isinstance(text, str):
        raise FormatError("DSSE envelope: base64 field is not a string")
    try:
        if strict:
            decoded = base64.b64decode(text, validate=True)
            # b64decode ignores the unused low bits of the last character; canonical text has them zero.
            if base64.b64encode(decoded).decode("ascii") != text:
                raise FormatError("DSSE envelope: base64 is not in canonical form")
            return decoded
        # The spec lets signers use standard or URL-safe base64; a lenient reader accepts both.
        alphabet = "-_" if ("-" in text or "_" in text) else "+/"
        return base64.b64decode(text, altchars=alphabet.encode(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"DSSE envelope: invalid base64 ({exc})") from exc


def sign(payload: bytes, payload_type: str, signer: Signer) -> Envelope:
    sig = signer.private_key.sign(pae(payload_type, payload))
    return Envelope(payload, payload_type, (Signature(signer.keyid, sig),))


def verify_signature(key: PublicKey, sig: bytes, message: bytes) -> None:
    """Raise SignatureError unless `sig` is `key`'s signature of `message`."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if len(sig) == 64:  # raw r || s, as in DSSE's test vector
                sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise SignatureError(f"unsupported public key type {type(key).__name__}")
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify") from exc


@dataclass(frozen=True)
class Verified:
    payload: bytes
    payload_type: str
    key: TrustedKey


def verify(envelope: Envelope, payload_type: str, trusted: Mapping[str, TrustedKey]) -> Verified:
    """Check the envelope's type and find one signature by a trusted key that verifies."""
    if envelope.payload_type != payload_type:
        raise SignatureError(f"envelope payloadType is {envelope.payload_type!r}, expected {payload_type!r}")
    message = pae(envelope.payload_type, envelope.payload)
    failures = []
    for s in envelope.signatures:
        key = trusted.get(s.keyid)
        if key is None:
            continue
        try:
            verify_signature(key.public_key, s.sig, message)
        except SignatureError:
            failures.append(key.name)
            continue
        return Verified(envelope.payload, envelope.payload_type, key)
    if failures:
        raise SignatureError(f"signature by key {failures[0]!r} does not verify: the signed content was modified")
    ids = ", ".join(s.keyid for s in envelope.signatures)
    raise UnknownKeyError(f"signed by unknown key {ids}")
