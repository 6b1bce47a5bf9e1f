"""The behavior artifact: one safetensors file holding a behavior's tensors, its manifest
(canonical JSON) and a DSSE signature over the manifest. Spec: docs/spec/artifact.md."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from revreg.artifacts.canonical import canonical_json, strict_loads
from revreg.artifacts.dsse import Envelope, sign, verify
from revreg.artifacts.identity import (
    ALGORITHMS,
    CHUNK_SIZE,
    BufferSource,
    Identity,
    TensorSource,
    hash_tensors,
    parse_identity,
)
from revreg.artifacts.keys import Signer, TrustedKey
from revreg.artifacts.safetensors_io import (
    SMALL_HEADER_BYTES,
    Header,
    MappedFile,
    MappedTensor,
    TensorData,
    canonical_header,
    read_header,
    write_safetensors,
)
from revreg.artifacts.sources import MappedSource
from revreg.errors import FormatError, InputError, IntegrityError

SCHEMA = "revreg.behavior/v1"
PAYLOAD_TYPE = "application/vnd.revreg.behavior-manifest+json"
# The identity scheme's algorithm `pack` signs the tensors with: the same security as sha256 at a
# fraction of its cost where sha256 has no instructions of its own (docs/performance.md); push
# and pull then make one sha256 pass (the file's content address) instead of two.
TENSOR_HASH = "blake3"
MANIFEST_KEY = "revreg.manifest"
SIGNATURE_KEY = "revreg.signature"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
TARGET_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# kind -> (role -> tensor-name suffix)
KIND_ROLES: dict[str, dict[str, str]] = {
    "lora": {"A": "lora_A", "B": "lora_B"},
    "ia3": {"scale": "ia3_scale"},
    "steer": {"vector": "steer_vector"},
}
LORA_LAYERS = ("linear", "embedding")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InputError(
            f"invalid behavior name {name!r}: use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators)"
        )
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise InputError(f"invalid version {version!r}: use letters, digits, '.', '_', '+' or '-' (at most 64)")
    return version


@dataclass(frozen=True)
class Attachment:
    """One attachment point: what is added to the module at `target`, and with which tensors."""

    target: str
    kind: str
    tensors: dict[str, str]  # role -> tensor name in the artifact
    layer: str | None = None  # lora: "linear" (Linear and GPT-2 Conv1D) or "embedding"
    rank: int | None = None
    alpha: float | None = None
    rslora: bool = False

    @property
    def scaling(self) -> float | None:
        if self.kind != "lora" or self.rank is None or self.alpha is None:
            return None
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "kind": self.kind, "tensors": dict(self.tensors)}
        if self.kind == "lora":
            out |= {
                "layer": self.layer,
                "rank": self.rank,
                "alpha": self.alpha,
                "rslora": self.rslora,
                "scaling": self.scaling,
            }
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> Attachment:
        if not isinstance(doc, dict):
            raise FormatError("manifest attachment is not an object")
        kind = doc.get("kind")
        if kind not in KIND_ROLES:
            raise FormatError(f"manifest attachment has unknown kind {kind!r}")
        allowed = {"target", "kind", "tensors"} | (
            {"layer", "rank", "alpha", "rslora", "scaling"} if kind == "lora" else set()
        )
        if set(doc) != allowed:
            raise FormatError(f"{kind} attachment needs exactly the fields {sorted(allowed)}")
        att = cls(
            target=doc["target"],
            kind=kind,
            tensors=doc["tensors"],
            layer=doc.get("layer"),
            rank=doc.get("rank"),
            alpha=doc.get("alpha"),
            rslora=doc.get("rslora", False),
        )
        if kind == "lora":
            rank, alpha = att.rank, att.alpha
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise FormatError(f"attachment {att.target}: lora rank must be a positive integer, got {rank!r}")
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"):
                raise FormatError(f"attachment {att.target}: lora alpha must be a positive number, got {alpha!r}")
            if not isinstance(att.rslora, bool):
                raise FormatError(f"attachment {att.target}: rslora must be true or false")
            if doc["scaling"] != att.scaling:
                raise FormatError(f"attachment {att.target}: scaling does not follow from rank and alpha")
        return att


@dataclass(frozen=True)
class BehaviorManifest:
    name: str
    version: str
    base: Identity
    tensors_digest: Identity
    attachments: tuple[Attachment, ...]
    created: str
    description: str = ""
    license: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "base": {"identity": self.base},
            "tensors": {"digest": self.tensors_digest},
            "attachments": [a.to_dict() for a in self.attachments],
            "created": self.created,
            "description": self.description,
            "license": self.license,
            "provenance": self.provenance,
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> BehaviorManifest:
        doc = strict_loads(data, "artifact manifest")
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise FormatError(f"artifact manifest is not a {SCHEMA} document")
        expected = {
            "schema",
            "name",
            "version",
            "base",
            "tensors",
            "attachments",
            "created",
            "description",
            "license",
            "provenance",
        }
        if set(doc) != expected:
            raise FormatError(f"artifact manifest fields differ from {sorted(expected)}")
        for key, kind in (
            ("name", str),
            ("version", str),
            ("provenance", dict),
            ("description", str),
            ("license", str),
            ("created", str),
        ):
            if not isinstance(doc[key], kind):
                raise FormatError(f"artifact manifest {key} is not a JSON {'object' if kind is dict else 'string'}")
        try:
            manifest = cls(
                name=check_name(doc["name"]),  # signed or not, what pack would refuse is refused
                version=check_version(doc["version"]),
                base=parse_identity(doc["base"]["identity"]),
                tensors_digest=parse_identity(doc["tensors"]["digest"]),
                attachments=tuple(Attachment.from_dict(a) for a in doc["attachments"]),
                created=doc["created"],
                description=doc["description"],
                license=doc["license"],
                provenance=doc["provenance"],
            )
        except (KeyError, TypeError, InputError) as exc:
            raise FormatError(f"malformed artifact manifest ({exc})") from exc
        if manifest.to_bytes() != data:
            raise FormatError("artifact manifest is not in canonical form")
        return manifest


def _validate(attachments: tuple[Attachment, ...], header_shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Every tensor is used by exactly one attachment, named after it, with a sane shape."""
    used: set[str] = set()
    targets: set[tuple[str, str]] = set()
    for a in attachments:
        if not isinstance(a.target, str) or not TARGET_RE.fullmatch(a.target):
            raise InputError(f"attachment target {a.target!r} is not a module path like 'h.0.attn'")
        if (a.target, a.kind) in targets:
            raise InputError(f"two {a.kind} attachments on {a.target}")
        targets.add((a.target, a.kind))
        roles = KIND_ROLES[a.kind]
        if not isinstance(a.tensors, dict) or set(a.tensors) != set(roles):
            raise InputError(f"{a.kind} attachment on {a.target} needs tensors {sorted(roles)}")
        for role, suffix in roles.items():
            tname = a.tensors[role]
            if tname != f"{a.target}.{suffix}":
                raise InputError(f"tensor for {a.target} {role} must be named {a.target}.{suffix}")
            if tname not in header_shapes:
                raise InputError(f"attachment on {a.target} uses missing tensor {tname!r}")
            if tname in used:
                raise InputError(f"tensor {tname!r} is used twice")
            used.add(tname)
            if header_shapes[tname][0] not in FLOAT_DTYPES:
                raise InputError(f"tensor {tname!r} has dtype {header_shapes[tname][0]}; behaviors are floating point")
        shapes = {role: header_shapes[a.tensors[role]][1] for role in roles}
        if a.kind == "lora":
            if a.layer not in LORA_LAYERS:
                raise InputError(f"lora on {a.target}: layer must be one of {', '.join(LORA_LAYERS)}")
            A, B = shapes["A"], shapes["B"]
            if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
                raise InputError(f"lora on {a.target}: A must be [r, in] and B [out, r]; got {list(A)} and {list(B)}")
            if a.rank != A[0] or not isinstance(a.alpha, int | float) or isinstance(a.alpha, bool) or a.alpha <= 0:
                raise InputError(f"lora on {a.target}: rank must be {A[0]} and alpha a positive number")
            if not isinstance(a.rslora, bool):
                raise InputError(f"lora on {a.target}: rslora must be true or false")
        elif len(next(iter(shapes.values()))) != 1:
            raise InputError(f"{a.kind} on {a.target}: its tensor must be one-dimensional")
    unused = set(header_shapes) - used
    if unused:
        raise InputError(f"tensors not used by any attachment: {', '.join(sorted(unused)[:5])}")


def _source(name: str, dtype: str, shape: tuple[int, ...], data: TensorData) -> TensorSource:
    """What hashing reads: a tensor in memory, or one left in its mapped file (chunk by chunk)."""
    if isinstance(data, MappedTensor):
        return _ReadSource(name, data)
    return BufferSource(name, dtype, shape, memoryview(data))


@dataclass(frozen=True)
class _ReadSource:
    """A tensor still in its input file, hashed from reads (a file cut short is an InputError)."""

    name: str
    tensor: MappedTensor

    @property
    def dtype(self) -> str:
        return self.tensor.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.info.shape

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def chunk(self, index: int) -> bytes:
        lo = index * CHUNK_SIZE
        return self.tensor.read(lo, min(lo + CHUNK_SIZE, self.tensor.nbytes))

    def done(self, index: int) -> None:
        return None


def _check_provenance(attachments: tuple[Attachment, ...], provenance: Mapping[str, Any]) -> None:
    if "peft_config" not in provenance:
        return  # only a PEFT import records one (provenance is an object: from_bytes): 30 ms of imports skipped
    from revreg.artifacts.peft_io import check_provenance

    check_provenance(attachments, dict(provenance))


def utc_timestamp(when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")  # what utc_timestamp writes


def _is_date(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def pack(
    out: Path,
    tensors: Mapping[str, tuple[str, tuple[int, ...], TensorData]],
    attachments: tuple[Attachment, ...],
    *,
    name: str,
    version: str,
    base: Identity,
    signer: Signer,
    created: str,
    description: str = "",
    license: str = "",
    provenance: Mapping[str, Any] | None = None,
    tensor_hash: str = TENSOR_HASH,
) -> BehaviorManifest:
    """Sign and write an artifact. The same inputs, key and `created` give the same bytes.

    `tensor_hash` is the identity scheme's algorithm for the signed `tensors.digest` (blake3 by
    default: docs/spec/artifact.md says why; sha256 where a policy asks for it). The file's own
    sha256, its content address in the registry, does not depend on it."""
    if not (TIMESTAMP_RE.fullmatch(created) and _is_date(created)):
        raise InputError(f"created {created!r} is not a UTC time like 2026-01-31T12:00:00Z")
    if tensor_hash not in ALGORITHMS:
        raise InputError(f"unknown tensor hash {tensor_hash!r}: use one of {', '.join(ALGORITHMS)}")
    _validate(attachments, {n: (d, s) for n, (d, s, _) in tensors.items()})
    _check_provenance(attachments, provenance or {})
    digest = hash_tensors([_source(n, d, s, b) for n, (d, s, b) in tensors.items()], tensor_hash).identity
    manifest = BehaviorManifest(
        name=check_name(name),
        version=check_version(version),
        base=parse_identity(base),
        tensors_digest=digest,
        attachments=tuple(sorted(attachments, key=lambda a: (a.target, a.kind))),
        created=created,
        description=description,
        license=license,
        provenance=dict(provenance or {}),
    )
    payload = manifest.to_bytes()
    envelope = sign(payload, PAYLOAD_TYPE, signer)
    streamed = any(isinstance(d, MappedTensor) for _, _, d in tensors.values())
    write_safetensors(
        out,
        dict(tensors),
        {MANIFEST_KEY: payload.decode("utf-8"), SIGNATURE_KEY: envelope.to_json().decode("utf-8")},
        # Tensors read from a file are read twice (hashed, then written): what was written must
        # be what was signed, or there is no artifact.
        expect=digest if streamed else None,
    )
    return manifest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A parsed artifact whose signature and tensors have not been checked yet."""

    path: Path
    header: Header
    manifest: BehaviorManifest
    envelope: Envelope


@dataclass(frozen=True)
class VerifiedArtifact:
    artifact: Artifact
    signer: TrustedKey
    digest: str  # sha256 of the whole file: the registry's content address

    @property
    def manifest(self) -> BehaviorManifest:
        return self.artifact.manifest


def open_artifact(path: Path) -> Artifact:
    """Parse an artifact, refusing anything its manifest and signature do not cover."""
    path = Path(path)
    return artifact_from_header(read_header(path, SMALL_HEADER_BYTES), path)


def artifact_from_header(header: Header, path: Path) -> Artifact:
    """The artifact a parsed header describes (its file at `path`, or arriving there in a
    stream: revreg.artifacts.stream), refusing anything its manifest and signature do not cover."""
    if canonical_header(header) != header.raw:
        raise FormatError(f"{path}: header is not in revreg's canonical form (modified after packing?)")
    if set(header.metadata) != {MANIFEST_KEY, SIGNATURE_KEY}:
        extra = sorted(set(header.metadata) ^ {MANIFEST_KEY, SIGNATURE_KEY})
        raise FormatError(f"{path}: not a revreg artifact (metadata keys missing or unexpected: {', '.join(extra)})")
    payload = header.metadata[MANIFEST_KEY].encode("utf-8")
    manifest = BehaviorManifest.from_bytes(payload)
    envelope = Envelope.from_json(header.metadata[SIGNATURE_KEY])
    if envelope.payload != payload:
        raise FormatError(f"{path}: the signature envelope covers a different manifest")
    try:
        _validate(manifest.attachments, {t.name: (t.dtype, t.shape) for t in header.tensors})
        _check_provenance(manifest.attachments, manifest.provenance)
    except InputError as exc:
        raise FormatError(f"{path}: manifest does not match the tensors ({exc})") from exc
    return Artifact(path, header, manifest, envelope)


def verify_signature(artifact: Artifact, trusted: Mapping[str, TrustedKey]) -> TrustedKey:
    """The trusted key whose signature covers the artifact's manifest (SignatureError if none)."""
    return verify(artifact.envelope, PAYLOAD_TYPE, trusted).key


def tensors_algorithm(manifest: BehaviorManifest) -> str:
    """The algorithm the signed `tensors.digest` names (parse_identity allowed only known ones)."""
    return manifest.tensors_digest.split(":", 1)[0]


def verify_artifact(
    artifact: Artifact, trusted: Mapping[str, TrustedKey], digest: str | None = None
) -> VerifiedArtifact:
    """Check the signature against trusted keys, then every tensor byte against the manifest.

    `digest` is the file's sha256 when the caller has already computed it while copying.
    """
    signer = verify_signature(artifact, trusted)
    with MappedFile(artifact.path) as mapped:
        if mapped.header != artifact.header:
            raise IntegrityError(f"{artifact.path} changed while it was being verified")
        algorithm = tensors_algorithm(artifact.manifest)
        actual = hash_tensors([MappedSource(mapped, t) for t in mapped.header.tensors], algorithm).identity
    if actual != artifact.manifest.tensors_digest:
        raise IntegrityError(
            f"{artifact.path}: tensor bytes do not match the signed manifest "
            f"(expected {artifact.manifest.tensors_digest}, got {actual})"
        )
    return VerifiedArtifact(artifact, signer, digest or file_digest(artifact.path))


def load_artifact(path: Path, trusted: Mapping[str, TrustedKey]) -> VerifiedArtifact:
    return verify_artifact(open_artifact(path), trusted)


def read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """All tensors of a safetensors file as name -> (dtype, shape, bytes): for small files."""
    with MappedFile(path) as mapped:
        return {t.name: (t.dtype, t.shape, bytes(mapped.view(t))) for t in mapped.header.tensors}
