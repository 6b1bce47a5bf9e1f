"""The registry's interface: the `RegistryAPI` protocol, the entities that cross it, its errors
and their HTTP statuses, and the one JSON shape of each entity.

Both implementations (`service.Registry` on SQL, `remote.RemoteRegistry` over HTTP) follow this
interface; the server and the CLI's `--json` speak the JSON shapes defined here. Nothing here
imports SQLAlchemy, so the HTTP client does not either.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from revreg.errors import (
    CheckFailed,
    FormatError,
    InputError,
    IntegrityError,
    KeyringError,
    RevregError,
    SignatureError,
    UnknownKeyError,
    Unreachable,
)

if TYPE_CHECKING:
    from revreg.artifacts.keys import TrustedKey

# -- errors ------------------------------------------------------------------------------------


class NotFound(InputError):
    """No such behavior, version, tag, key, base, probe set or request."""


class ConflictError(RevregError):
    """The change contradicts what the registry already holds (immutability, races)."""


class StateError(RevregError):
    """The lifecycle does not allow this transition."""


class GateError(RevregError):
    """The version does not meet the publish policy."""

    exit_code = 1


class AuthError(RevregError):
    """The token is missing, unknown, expired or revoked (HTTP 401)."""


class ScopeError(RevregError):
    """The token is valid but its scopes do not cover this action (HTTP 403)."""


class SchemaError(RevregError):
    """The database is missing, not a registry, or at another schema version."""


class Unsupported(InputError):
    """This registry implementation cannot offer the verb (e.g. a server-side command over HTTP)."""


# The one table of error kinds that cross the HTTP boundary: the server answers with the status
# and the class name; the client raises the class of that name. Order matters for subclasses:
# the first entry that the exception is an instance of gives its status.
ERROR_STATUS: tuple[tuple[type[RevregError], int], ...] = (
    (AuthError, 401),
    (ScopeError, 403),
    (NotFound, 404),
    (ConflictError, 409),
    (StateError, 409),
    (GateError, 409),
    (Unsupported, 400),
    (UnknownKeyError, 400),
    (SignatureError, 400),
    (FormatError, 400),
    (InputError, 400),
    (IntegrityError, 400),
    (KeyringError, 400),
    (CheckFailed, 400),
    (SchemaError, 503),
    (Unreachable, 502),
    (RevregError, 400),
)
ERRORS_BY_NAME: dict[str, type[RevregError]] = {cls.__name__: cls for cls, _ in ERROR_STATUS}


def http_status(exc: RevregError) -> int:
    return next(code for cls, code in ERROR_STATUS if isinstance(exc, cls))


# -- entities ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    digest: str
    size: int
    state: str
    base_identity: str
    signer_keyid: str
    signer_name: str | None
    signer_revoked: bool
    pushed_at: datetime
    pushed_by: str
    tags: tuple[str, ...]
    yank_reason: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def pinned(self) -> str:
        """NAME@DIGEST: the reference that names exactly these bytes, whatever tags do later."""
        return f"{self.name}@{self.digest}"

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)


def same_bytes(info: VersionInfo, digest: str) -> None:
    """Versions are immutable: other bytes under a stored NAME:VERSION are a conflict (one rule,
    for the SQL registry and for the HTTP client's check before an upload)."""
    if info.digest != digest:
        raise ConflictError(
            f"{info.ref} already exists with digest {info.digest}; versions are immutable, push a new version"
        )


@dataclass(frozen=True)
class PushResult:
    version: VersionInfo
    created: bool


@dataclass(frozen=True)
class KeyRecord:
    keyid: str
    name: str
    role: str
    revoked: bool
    revoked_reason: str | None
    added_at: datetime


@dataclass(frozen=True)
class BaseInfo:
    identity: str
    name: str | None
    tensor_count: int
    total_bytes: int


@dataclass(frozen=True)
class CertificationInfo:
    verifier_keyid: str
    passed: bool
    created_at: datetime
    envelope: str  # the signed DSSE envelope, byte for byte as recorded


@dataclass(frozen=True)
class ProbeSetInfo:
    name: str
    digest: str
    count: int
    created_at: datetime
    output: str = ""  # which model output a certification compares
    divergence: str = ""  # kl (distributions) or mse (hidden states)


@dataclass(frozen=True)
class AuditEntryInfo:
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    hash: str


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    rows: int
    problem: str | None  # names the first bad row


@dataclass(frozen=True)
class VersionDetail:
    info: VersionInfo
    manifest: dict[str, Any]
    certifications: tuple[CertificationInfo, ...]
    history: tuple[AuditEntryInfo, ...]
    base_registered: bool


@dataclass(frozen=True)
class FsckReport:
    blobs_checked: int
    versions_checked: int
    problems: tuple[str, ...]  # inconsistencies: exit 1
    warnings: tuple[str, ...]  # harmless leftovers of interrupted writes


@dataclass(frozen=True)
class Request:
    """A queued certification request. `ref` is pinned (NAME@DIGEST) and `probes` is a probe
    set digest, so what a worker runs is decided when the request is made, not when it is claimed."""

    id: int
    ref: str
    base: str
    factory: str | None
    probes: str
    device: str
    cycles: int
    baselines: tuple[str, ...]
    state: str
    attempts: int
    lease_owner: str | None
    result: str | None


# -- JSON shapes -------------------------------------------------------------------------------

T = TypeVar("T")


def to_json(obj: Any) -> Any:
    """An entity (or a list of them) as JSON values: datetimes in ISO 8601, tuples as lists.
    The one shape of each entity, used by the HTTP API and by every `--json` output."""
    if isinstance(obj, list | tuple):
        return [to_json(o) for o in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj


def _decode(hint: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _decode(inner, value, where)
    if hint is datetime:
        return datetime.fromisoformat(value)
    if origin is tuple:
        return tuple(_decode(typing.get_args(hint)[0], v, where) for v in value)
    if dataclasses.is_dataclass(hint):
        return from_json(typing.cast(type, hint), value)
    return value


def from_json(cls: type[T], doc: Any) -> T:
    """The inverse of `to_json` for one entity class; malformed documents are an InputError."""
    if not isinstance(doc, Mapping):
        raise InputError(f"expected a JSON object for {cls.__name__}, got {type(doc).__name__}")
    hints = typing.get_type_hints(cls)
    try:
        values = {f.name: _decode(hints[f.name], doc[f.name], cls.__name__) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**values)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed {cls.__name__} document ({exc!r})") from exc


# -- the interface -----------------------------------------------------------------------------


@runtime_checkable
class RegistryAPI(Protocol):
    """What every registry offers, locally or over HTTP. Rules (lifecycle, trust, immutability,
    audit) are enforced by the SQL implementation; the remote one re-checks what protects its
    user (digest, signature, tensors) on its side of the wire."""

    def describe(self) -> str: ...

    # keys
    def trust_key(self, pem: bytes, name: str, role: str) -> KeyRecord: ...
    def revoke_key(self, key_ref: str, reason: str) -> list[KeyRecord]: ...
    def key_records(self) -> list[KeyRecord]: ...
    def trusted(self, role: str, include_revoked: bool = False) -> dict[str, TrustedKey]: ...

    # bases
    def register_base(self, path: Path, name: str | None = None) -> tuple[BaseInfo, bool]: ...
    def bases(self) -> list[BaseInfo]: ...

    # versions
    def push(self, path: Path) -> PushResult: ...
    def pull(
        self,
        ref: str,
        dest: Path,
        fmt: str = "safetensors",
        allow_unpublished: bool = False,
        allow_yanked: bool = False,
    ) -> VersionInfo: ...
    def resolve(self, ref: str) -> VersionInfo: ...
    def ls(self, name: str | None = None) -> list[VersionInfo]: ...
    def show(self, ref: str) -> VersionDetail: ...
    def tag(self, ref: str, tag: str, allow_downgrade: bool = False) -> VersionInfo: ...
    def publish(self, ref: str) -> VersionInfo: ...
    def yank(self, ref: str, reason: str) -> VersionInfo: ...
    def record_certification(self, ref: str, envelope: bytes | str) -> VersionInfo: ...

    # probe sets
    def push_probes(self, path: Path) -> tuple[ProbeSetInfo, bool]: ...
    def probe_sets(self) -> list[ProbeSetInfo]: ...
    def probe_digest(self, ref: str) -> str: ...
    def fetch_probes(self, ref: str, directory: Path) -> Path: ...

    # certification queue
    def request_certification(
        self,
        ref: str,
        base: str,
        probes: str,
        factory: str | None = None,
        device: str = "cpu",
        cycles: int = 3,
        baselines: tuple[str, ...] = (),
    ) -> Request: ...
    def requests(self, state: str | None = None) -> list[Request]: ...
    def claim_request(self, worker: str, lease: float) -> Request | None: ...
    def renew_lease(self, request_id: int, worker: str, lease: float) -> bool: ...
    def complete_request(self, request_id: int, worker: str, envelope: bytes | str) -> VersionInfo | None: ...
    def fail_request(self, request_id: int, worker: str, message: str) -> None: ...

    # integrity
    def audit_log(self, subject: str | None = None) -> list[AuditEntryInfo]: ...
    def audit_verify(self) -> ChainVerdict: ...
    def fsck(self, prune: bool = False, grace: float = 3600.0) -> FsckReport: ...
