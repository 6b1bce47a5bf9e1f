"""The Registry service: push, pull, publish, yank, tags, keys, bases, audit and fsck.

Every rule lives here, not in the CLI: lifecycle transitions, trust, immutability, and the
audit row that goes with each change in the same transaction.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, select
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from revreg import progress
from revreg.artifacts.artifact import (
    VERSION_RE,
    Artifact,
    BehaviorManifest,
)
from revreg.artifacts.attestation import verify_certification
from revreg.artifacts.identity import TensorManifest
from revreg.artifacts.keys import TrustedKey, keyid_of, load_public_pem
from revreg.artifacts.keys import check_name as check_key_name
from revreg.artifacts.stream import ArtifactStream
from revreg.errors import (
    FormatError,
    InputError,
    IntegrityError,
    RevregError,
    SignatureError,
    Unreachable,
)
from revreg.registry import audit
from revreg.registry.api import (
    BaseInfo,
    CertificationInfo,
    ConflictError,
    FsckReport,
    KeyRecord,
    NotFound,
    ProbeSetInfo,
    PushResult,
    Request,
    SchemaError,
    StateError,
    VersionDetail,
    VersionInfo,
    same_bytes,
)
from revreg.registry.db import (
    Location,
    check_schema,
    check_upgradable,
    current_revision,
    make_engine,
    migrate,
    resolve,
)
from revreg.registry.delivery import check_format, deliver, renamed_in_errors
from revreg.registry.intake import check_signer, push_file
from revreg.registry.models import (
    ROLES,
    AuditEntry,
    BaseModel,
    Behavior,
    Blob,
    Certification,
    Key,
    ProbeSet,
    Setting,
    Tag,
    Version,
)
from revreg.registry.policy import EPOCH, PublishGate, RequirePassingCertification, newest, signed_time, statement_key
from revreg.registry.reader import DB_FILE, PublisherTrust, list_versions, publisher_trust, version_info
from revreg.registry.reader import unreachable as sqlite_unreachable
from revreg.registry.refs import Ref, parse_ref
from revreg.registry.store import (
    DEFAULT_GRACE,
    BlobStore,
    StagedBlob,
    Tap,
    check_digest,
    copy_hashing,
    digest_of,
    open_store,
)

# state -> states it may move to
TRANSITIONS: dict[str, set[str]] = {
    "pending": {"certified", "rejected", "yanked"},
    "certified": {"certified", "rejected", "published", "yanked"},
    "rejected": {"certified", "rejected", "yanked"},
    "published": {"yanked"},
    "yanked": set(),
}


def default_actor() -> str:
    if os.environ.get("REVREG_ACTOR"):
        return os.environ["REVREG_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# How far ahead of this server's clock a verifier's signed finish time may be.
CLOCK_SKEW = timedelta(minutes=5)


def _first_line(error: object) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _now() -> datetime:
    return datetime.now(UTC)


def _registry_directory(directory: Path) -> None:
    """Make an embedded registry's directory, or refuse in one line what cannot be one."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory: name a directory for the registry")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the registry directory {directory}: {exc.strerror}") from exc
    db_file = directory / DB_FILE
    if db_file.exists() and not db_file.is_file():
        raise InputError(f"{db_file} is not a file: it cannot be the registry's database (move it aside)")


def _as_recorded(v: Version, name: str, held: Artifact | RevregError | None) -> str | None:
    """Whether a version's blob holds the artifact its row records (fsck): one a pull would
    accept (tensors included), signed as this version, with the row's manifest, size and
    signer. Whether that signer is still trusted is policy, left to pull."""
    where = f"version {name}:{v.version} ({v.digest})"
    if not isinstance(held, Artifact):
        return f"{where} is not an artifact a pull would accept: {held}"
    m = held.manifest
    if (m.name, m.version) != (name, v.version):
        return f"{where} holds an artifact signed as {m.name}:{m.version}"
    if m.to_bytes().decode("utf-8") != v.manifest or held.header.file_size != v.size:
        return f"{where} holds another artifact than its row records (another manifest or size)"
    if v.signer_keyid not in {sig.keyid for sig in held.envelope.signatures}:
        return f"{where} is not signed by {v.signer_keyid}, the signer its row records"
    return None


def _insert(session: Session, model: type, values: dict[str, Any], index: list[str]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING on both backends."""
    from sqlalchemy import CursorResult
    from sqlalchemy.dialects import postgresql, sqlite

    if session.get_bind().dialect.name == "postgresql":
        stmt: Any = postgresql.insert(model).values(**values).on_conflict_do_nothing(index_elements=index)
    else:
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing(index_elements=index)
    result = session.execute(stmt)
    return isinstance(result, CursorResult) and result.rowcount == 1


class Registry:
    def __init__(
        self,
        engine: Engine,
        location: Location,
        store: BlobStore,
        actor: str | None = None,
        gate: PublishGate | None = None,
    ) -> None:
        self.engine = engine
        self.location = location
        self.store = store
        self.actor = actor or default_actor()
        self.gate: PublishGate = gate or RequirePassingCertification()
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | None = None, actor: str | None = None) -> Registry:
        loc = resolve(location)
        if loc.directory is not None and not (loc.directory / "registry.db").exists():
            raise InputError(f"no registry at {loc.directory}: create one with `revreg init`")
        if loc.directory is None and loc.is_sqlite:
            from sqlalchemy.engine import make_url

            database = make_url(loc.url).database  # connecting would create a missing file
            if database and database != ":memory:" and not Path(database).is_file():
                raise InputError(f"no registry at {loc.describe()}: create one with `revreg init`")
        engine = make_engine(loc)
        check_schema(engine, loc)
        with Session(engine) as s:
            store_url = s.get(Setting, "store")
        if store_url is None:
            raise InputError(f"registry at {loc.describe()} has no blob store configured: run `revreg init`")
        return cls(engine, loc, open_store(store_url.value, loc.directory), actor)

    @classmethod
    def init(cls, location: str | None = None, store: str | None = None, actor: str | None = None) -> Registry:
        loc = resolve(location)
        if loc.directory is not None:
            _registry_directory(loc.directory)
        elif store is None:
            store = cls._recorded_store(loc)
            if store is None:
                raise InputError("a database registry needs --store DIR (or s3://…) for its blobs")
        # An embedded registry keeps its blobs beside the database, recorded relatively so the
        # directory can be moved; any other store is recorded absolutely.
        store_url = "blobs" if store is None else store if "://" in store else str(Path(store).absolute())
        blob_store = open_store(store_url, loc.directory)
        engine = make_engine(loc)
        # A database that is not a registry is refused before anything is made (an SQLite file
        # is read, not opened by the engine); a new one is created only once the blob store is.
        check_upgradable(engine)
        blob_store.create()
        migrate(engine)
        registry = cls(engine, loc, blob_store, actor)
        with registry.transaction() as s:
            existing = s.get(Setting, "store")
            if existing is None:
                s.add(Setting(key="store", value=store_url))
                audit.append(s, registry.actor, "registry.init", loc.describe(), {"store": store_url})
            elif existing.value != store_url and store is not None:
                raise ConflictError(f"registry already uses the blob store {existing.value}")
        return registry

    def describe(self) -> str:
        return self.location.describe()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session (queue and tokens build on it)."""
        try:
            with Session(self.engine) as session:
                yield session
        except DataError as exc:
            raise InputError(f"the registry database refused a value ({_first_line(exc.orig)})") from exc
        except UnicodeDecodeError as exc:  # SQLite's message about a damaged file is not UTF-8
            raise SchemaError(f"the registry database is damaged ({exc.reason}): run `revreg fsck`") from exc

    @staticmethod
    def _recorded_store(loc: Location) -> str | None:
        """The blob store an existing database registry already records (re-running init on it
        only brings the schema current)."""
        engine = make_engine(loc)
        try:
            if current_revision(engine) is None:
                return None
            with Session(engine) as s:
                row = s.get(Setting, "store")
                return row.value if row else None
        finally:
            engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write transaction that commits on success; races on a unique constraint become
        ConflictError and database failures RevregError (queue and tokens build on it)."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SAIntegrityError as exc:
            # Two writers raced on a unique constraint; the loser's transaction was rolled back.
            raise ConflictError(f"the registry changed concurrently ({exc.orig}); retry") from exc
        except DataError as exc:
            # A value the database cannot hold (a NUL byte in PostgreSQL text, an integer out of range).
            raise InputError(f"the registry database refused a value ({_first_line(exc.orig)})") from exc
        except OperationalError as exc:
            raise Unreachable(f"registry database error: {_first_line(exc.orig or exc)}") from exc
        except UnicodeDecodeError as exc:
            raise SchemaError(f"the registry database is damaged ({exc.reason}): run `revreg fsck`") from exc

    # -- keys --------------------------------------------------------------------------------
    def trust_key(self, pem: bytes, name: str, role: str) -> KeyRecord:
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}")
        check_key_name(name)
        key = load_public_pem(pem, name)
        if not isinstance(key, Ed25519PublicKey):
            # Ed25519 signatures have one valid encoding; ECDSA's have several (DER or raw, s or
            # n - s), which would let anyone re-spell a recorded signature.
            raise InputError(f"key {name} is {type(key).__name__}: a registry trusts Ed25519 keys only")
        keyid = keyid_of(key)
        text = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        with self.transaction() as s:
            revoked = self._revoked(s, [keyid])
            if revoked is not None:
                # Revocation is of the key, in every role, for good: it can never be trusted again.
                raise ConflictError(
                    f"key {revoked.name} ({keyid}) was revoked ({revoked.revoked_reason}); revocation is permanent "
                    "in every role: generate a new key"
                )
            row = s.scalars(select(Key).where(Key.keyid == keyid, Key.role == role)).first()
            if row is not None:
                return self._key_record(row)
            row = Key(keyid=keyid, name=name, role=role, public_pem=text, added_at=_now(), added_by=self.actor)
            s.add(row)
            audit.append(s, self.actor, "key.trust", keyid, {"name": name, "role": role})
        return self._key_record(row)

    def revoke_key(self, key_ref: str, reason: str) -> list[KeyRecord]:
        if not reason.strip():
            raise InputError("a revocation needs a --reason")
        with self.transaction() as s:
            rows = list(s.scalars(select(Key).where((Key.keyid == key_ref) | (Key.name == key_ref))))
            if not rows:
                raise NotFound(f"no registry key with id or name {key_ref!r}")
            if len({r.keyid for r in rows}) > 1:
                raise InputError(f"{key_ref!r} names several keys: give the key id")
            for row in rows:
                if row.revoked_at is None:
                    row.revoked_at, row.revoked_reason = _now(), reason
            audit.append(s, self.actor, "key.revoke", rows[0].keyid, {"name": rows[0].name, "reason": reason})
        return [self._key_record(r) for r in rows]

    def key_records(self) -> list[KeyRecord]:
        with self.reading() as s:
            return [self._key_record(r) for r in s.scalars(select(Key).order_by(Key.name, Key.role))]

    @staticmethod
    def _key_record(row: Key) -> KeyRecord:
        return KeyRecord(row.keyid, row.name, row.role, row.revoked_at is not None, row.revoked_reason, row.added_at)

    def trusted(
        self, role: str, include_revoked: bool = False, *, session: Session | None = None
    ) -> dict[str, TrustedKey]:
        """Keys of a role, by key id: the trust anchors for that role (unrevoked ones by default;
        `include_revoked` is for reading old evidence, whose revocation the caller then reports)."""

        def load(s: Session) -> dict[str, TrustedKey]:
            q = select(Key).where(Key.role == role)
            if not include_revoked:
                q = q.where(Key.revoked_at.is_(None))
            return {
                r.keyid: TrustedKey(r.name, r.keyid, load_public_pem(r.public_pem.encode(), r.name))
                for r in s.scalars(q)
            }

        if session is not None:
            return load(session)
        with self.reading() as s:
            return load(s)

    def _revoked(self, s: Session, keyids: list[str]) -> Key | None:
        return s.scalars(select(Key).where(Key.keyid.in_(keyids), Key.revoked_at.is_not(None))).first()

    # -- bases -------------------------------------------------------------------------------
    def register_base(self, path: Path, name: str | None = None) -> tuple[BaseInfo, bool]:
        from revreg.artifacts.sources import identity_of_path

        return self.register_manifest(identity_of_path(path), name)

    def register_manifest(self, manifest: TensorManifest, name: str | None = None) -> tuple[BaseInfo, bool]:
        """Record a base from its per-tensor manifest (computed where the weights are)."""
        with self.transaction() as s:
            row = s.scalars(select(BaseModel).where(BaseModel.identity == manifest.identity)).first()
            if row is not None:
                return self._base_info(row), False
            row = BaseModel(
                identity=manifest.identity,
                name=name,
                tensor_count=len(manifest.tensors),
                total_bytes=manifest.total_bytes,
                manifest=json.dumps(manifest.to_dict()),
                registered_at=_now(),
                registered_by=self.actor,
            )
            s.add(row)
            audit.append(s, self.actor, "base.register", manifest.identity, {"name": name})
        return self._base_info(row), True

    def bases(self) -> list[BaseInfo]:
        with self.reading() as s:
            return [self._base_info(r) for r in s.scalars(select(BaseModel).order_by(BaseModel.registered_at))]

    @staticmethod
    def _base_info(row: BaseModel) -> BaseInfo:
        return BaseInfo(row.identity, row.name, row.tensor_count, row.total_bytes)

    # -- push --------------------------------------------------------------------------------
    def push(self, path: Path) -> PushResult:
        """Store an artifact after checking format, signer trust, signature and every tensor.

        The header is parsed and its signature verified first, from the file, before a byte is
        copied. A version already stored costs one hash pass over the file and no copy. Otherwise
        the bytes are read once: streamed into the store's staging area while the file's digest
        and every tensor's digest are computed from the same buffers (revreg.artifacts.stream),
        so what is stored is exactly what was checked. The steps are `registry.intake`'s, which
        `revreg push` also runs on an embedded registry before SQLAlchemy has loaded.
        """
        return push_file(path, self, self.store, lambda: self)

    def trust(self) -> PublisherTrust:
        """The publisher keys and revoked key ids a push's signature is checked against."""
        with self._driver() as conn:
            return publisher_trust(conn)

    def stored(self, name: str, version: str) -> VersionInfo | None:
        """NAME:VERSION if it is stored (no tags), read as `revreg push` reads it before copying."""
        with self._driver() as conn:
            return version_info(conn, name, version)

    def push_streamed(self, staged: StagedBlob, stream: ArtifactStream) -> PushResult:
        """Store an artifact whose checks ran while it streamed into staging (`stream` was its
        tap, and its `on_header` returned the key `signed_by` verified): local pushes and the
        server's uploads arrive this way."""
        artifact = stream.finish()
        if stream.signer is None:  # fail closed: a tap without a signature check stores nothing
            raise SignatureError(f"{stream.where}: its signature was never checked; nothing was stored")
        return self._record(staged, artifact, stream.signer)

    def signed_by(self, artifact: Artifact, label: str, authorize: Callable[[str], None] | None = None) -> TrustedKey:
        """The trusted, unrevoked publisher key that signed `artifact` (from its header alone);
        `authorize(name)` runs first and may refuse."""
        if authorize is not None:
            authorize(artifact.manifest.name)
        return check_signer(self.trust(), artifact, label)

    def _record(self, staged: StagedBlob, artifact: Artifact, signer: TrustedKey) -> PushResult:
        """Make checked, staged bytes a version (or find them already one)."""
        m = artifact.manifest
        existing = self._existing(m.name, m.version, staged.digest)
        if existing is not None:
            self._restore_blob(staged, existing.ref)
            return PushResult(existing, False)
        with self.reading() as s:  # every refusal that can be known now, before the blob moves
            self._refuse_revoked(s, m, signer)
            self._refuse_shadowing(s, m)
        self.store.commit(staged)
        try:
            with self.transaction() as s:
                # The signature was checked on the header, before the data arrived; a revocation
                # since then (this transaction sees every committed one) refuses the push.
                self._refuse_revoked(s, m, signer)
                _insert(s, Blob, {"digest": staged.digest, "size": staged.size, "created_at": _now()}, ["digest"])
                _insert(s, Behavior, {"name": m.name, "created_at": _now()}, ["name"])
                behavior = s.scalars(select(Behavior).where(Behavior.name == m.name)).one()
                self._refuse_shadowing(s, m)  # the last guard, for a tag set meanwhile
                s.add(
                    Version(
                        behavior_id=behavior.id,
                        version=m.version,
                        digest=staged.digest,
                        size=staged.size,
                        base_identity=m.base,
                        signer_keyid=signer.keyid,
                        manifest=m.to_bytes().decode("utf-8"),
                        state="pending",
                        pushed_at=_now(),
                        pushed_by=self.actor,
                    )
                )
                s.flush()
                audit.append(
                    s,
                    self.actor,
                    "version.push",
                    f"{m.name}:{m.version}",
                    {"digest": staged.digest, "signer": signer.keyid, "base": m.base},
                )
        except ConflictError as exc:
            existing = self._existing(m.name, m.version, staged.digest)
            if existing is not None:
                self._restore_blob(staged, existing.ref)
                return PushResult(existing, False)
            raise ConflictError(f"{m.name}:{m.version} was pushed concurrently with different bytes") from exc
        if not self.store.exists(staged.digest) and staged.path.exists():
            # A prune that judged an older copy abandoned may have taken the object the push
            # relied on (stores without local renames); the checked bytes are still staged.
            self.store.commit(staged)
        return PushResult(self.resolve(Ref(m.name, m.version)), True)

    @staticmethod
    def _refuse_shadowing(s: Session, m: BehaviorManifest) -> None:
        shadowed = s.scalars(
            select(Tag.id)
            .join(Behavior, Behavior.id == Tag.behavior_id)
            .where(Behavior.name == m.name, Tag.tag == m.version)
        ).first()
        if shadowed is not None:
            raise StateError(
                f"{m.name}:{m.version} would shadow the tag {m.version!r} of {m.name}; "
                "a version and a tag never share a name: pick another version"
            )

    def _refuse_revoked(self, s: Session, m: BehaviorManifest, signer: TrustedKey) -> None:
        revoked = self._revoked(s, [signer.keyid])
        if revoked is not None:
            raise SignatureError(
                f"{m.name}:{m.version} is signed by revoked key {revoked.name} ({revoked.keyid}): "
                f"{revoked.revoked_reason}; no version was recorded"
            )

    def _restore_blob(self, staged: StagedBlob, subject: str) -> None:
        """The version is recorded; if its blob went missing (lost, or pruned by an older revreg),
        the bytes just checked put it back instead of answering "already present" over a hole."""
        if self.store.exists(staged.digest):
            return
        self.store.commit(staged)
        with self.transaction() as s:
            audit.append(s, self.actor, "blob.restore", subject, {"digest": staged.digest})

    def _existing(self, name: str, version: str, digest: str) -> VersionInfo | None:
        """The version if it exists with these bytes; ConflictError if with other bytes."""
        info = self.stored(name, version)
        if info is not None:
            same_bytes(info, digest)
        return info

    # -- reading -----------------------------------------------------------------------------
    def _info(self, s: Session, v: Version) -> VersionInfo:
        key = s.scalars(select(Key).where(Key.keyid == v.signer_keyid)).first()
        revoked = s.scalars(select(Key.id).where(Key.keyid == v.signer_keyid, Key.revoked_at.is_not(None))).first()
        tags = tuple(sorted(s.scalars(select(Tag.tag).where(Tag.version_id == v.id))))
        return VersionInfo(
            v.behavior.name,
            v.version,
            v.digest,
            v.size,
            v.state,
            v.base_identity,
            v.signer_keyid,
            key.name if key else None,
            revoked is not None,
            v.pushed_at,
            v.pushed_by,
            tags,
            v.yank_reason,
        )

    def find_version(self, s: Session, ref: Ref, tags: bool = True) -> Version:
        """The version row a reference names, inside the caller's session."""
        behavior = s.scalars(select(Behavior).where(Behavior.name == ref.name)).first()
        if behavior is None:
            raise NotFound(f"no behavior named {ref.name!r}")
        q = select(Version).where(Version.behavior_id == behavior.id)
        if ref.digest:
            v = s.scalars(q.where(Version.digest == ref.digest)).first()
        elif ref.selector:
            v = s.scalars(q.where(Version.version == ref.selector)).first()
            if v is None and tags:
                tag = s.scalars(select(Tag).where(Tag.behavior_id == behavior.id, Tag.tag == ref.selector)).first()
                v = s.get(Version, tag.version_id) if tag else None
        else:
            tag = s.scalars(select(Tag).where(Tag.behavior_id == behavior.id, Tag.tag == "latest")).first()
            v = (
                s.get(Version, tag.version_id)
                if tag
                else s.scalars(
                    q.where(Version.state == "published").order_by(Version.pushed_at.desc(), Version.id.desc())
                ).first()
            )
            if v is None:
                raise NotFound(f"{ref.name} has no published version and no 'latest' tag: name a version")
        if v is None:
            raise NotFound(f"no version {ref} (see `revreg ls {ref.name}`)")
        return v

    def resolve(self, ref: Ref | str, tags: bool = True) -> VersionInfo:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.reading() as s:
            return self._info(s, self.find_version(s, ref, tags))

    def ls(self, name: str | None = None) -> list[VersionInfo]:
        """Every version (or NAME's): the driver-level listing `revreg ls` also runs without
        SQLAlchemy (registry.reader), here on this engine's connection in one read transaction."""
        with self._driver() as conn:
            return list_versions(conn, name)

    @contextmanager
    def _driver(self) -> Iterator[Any]:
        """This engine's DB-API connection in one read transaction, for `registry.reader`; the
        driver's errors become revreg's as a session's do."""
        try:
            with self.engine.connect() as conn, conn.begin():
                dbapi = conn.dialect.loaded_dbapi
                try:
                    yield conn.connection.driver_connection
                except dbapi.OperationalError as exc:
                    if isinstance(exc, sqlite3.Error) and not sqlite_unreachable(exc):
                        raise SchemaError(f"the registry database is not one this revreg can read: {exc}") from exc
                    raise Unreachable(f"registry database error: {_first_line(exc)}") from exc
                except dbapi.DataError as exc:  # a value the database cannot hold (NUL in PostgreSQL text)
                    raise InputError(f"the registry database refused a value ({_first_line(exc)})") from exc
                except dbapi.Error as exc:
                    raise SchemaError(f"cannot read the registry database: {_first_line(exc)}") from exc
        except OperationalError as exc:
            raise Unreachable(f"registry database error: {_first_line(exc.orig or exc)}") from exc

    def show(self, ref: Ref | str) -> VersionDetail:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.reading() as s:
            v = self.find_version(s, ref)
            info = self._info(s, v)
            certs = tuple(
                CertificationInfo(c.verifier_keyid, c.passed, c.created_at, c.envelope)
                for c in s.scalars(
                    select(Certification).where(Certification.version_id == v.id).order_by(Certification.id)
                )
            )
            history = tuple(
                audit.info(e)
                for e in s.scalars(select(AuditEntry).where(AuditEntry.subject == info.ref).order_by(AuditEntry.seq))
            )
            base = s.scalars(select(BaseModel.id).where(BaseModel.identity == v.base_identity)).first()
            return VersionDetail(info, json.loads(v.manifest), certs, history, base is not None)

    # -- lifecycle ---------------------------------------------------------------------------
    def _locked(self, s: Session, ref: Ref) -> Version:
        """The version row, locked for this transaction (FOR UPDATE on PostgreSQL), so concurrent
        lifecycle changes serialize instead of one silently overwriting another."""
        v = self.find_version(s, ref)
        s.refresh(v, with_for_update=True)
        return v

    def _transition(self, s: Session, v: Version, to: str) -> None:
        if to not in TRANSITIONS[v.state]:
            raise StateError(f"{v.behavior.name}:{v.version} is {v.state}; it cannot become {to}")
        v.state = to

    def record_certification(self, ref: Ref | str, envelope: bytes | str) -> VersionInfo:
        """Store a verifier's signed certification and move the version to certified/rejected."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.transaction() as s:
            return self.record_certification_in(s, ref, envelope)

    def record_certification_in(self, s: Session, ref: Ref, envelope: bytes | str) -> VersionInfo:
        """record_certification inside the caller's transaction (the worker queue commits the
        certification and the end of its lease together)."""
        text = envelope.decode("utf-8") if isinstance(envelope, bytes) else envelope
        v = self._locked(s, ref)
        verifiers = self.trusted("verifier", session=s)
        cert = verify_certification(text, verifiers)
        if cert.subject_digest != v.digest:
            raise IntegrityError(f"the certification is about {cert.subject_digest}, not {v.digest}")
        finished = signed_time(cert)
        if finished == EPOCH or finished > _now() + CLOCK_SKEW:
            raise FormatError(
                f"the certification's finished_at {cert.finished_at!r} is missing, malformed or in the future; "
                "a verdict's place in the version's history is its signed finish time"
            )
        recorded = list(
            s.scalars(select(Certification.envelope).where(Certification.version_id == v.id).order_by(Certification.id))
        )
        # The same statement by the same key again (however its envelope is spelled) is a no-op.
        statement = statement_key(text)
        if any(statement_key(r) == statement for r in recorded):
            return self._info(s, v)
        # The newest verdict decides the state; evidence older than it changes nothing. Only
        # unrevoked verifiers count here, exactly as in the publish gate.
        current = newest(recorded, verifiers, v.digest)
        if current is not None and finished < signed_time(current):
            raise StateError(
                f"{v.behavior.name}:{v.version} has a newer certification (finished {current.finished_at}, "
                f"{current.verdict}); an older one ({cert.finished_at}, {cert.verdict}) changes nothing: "
                "run a new certification"
            )
        s.add(
            Certification(
                version_id=v.id,
                verifier_keyid=cert.verifier.keyid,
                passed=cert.passed,
                envelope=text,
                created_at=_now(),
            )
        )
        verdict = newest([*recorded, text], verifiers, v.digest)
        assert verdict is not None
        if v.state != "published":
            self._transition(s, v, "certified" if verdict.passed else "rejected")
        audit.append(
            s,
            self.actor,
            "version.certify",
            f"{v.behavior.name}:{v.version}",
            {"verdict": cert.verdict, "verifier": cert.verifier.keyid, "state": v.state},
        )
        return self._info(s, v)

    def _gate(self, s: Session, v: Version) -> None:
        envelopes = list(s.scalars(select(Certification.envelope).where(Certification.version_id == v.id)))
        self.gate.verify(f"{v.behavior.name}:{v.version}", v.digest, envelopes, self.trusted("verifier", session=s))

    def publish(self, ref: Ref | str) -> VersionInfo:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.transaction() as s:
            v = self._locked(s, ref)
            if v.state == "published":
                # Idempotent, so a publish retried after a crash or a CI re-run succeeds.
                return self._info(s, v)
            if v.state in ("pending", "rejected"):
                raise StateError(
                    f"{v.behavior.name}:{v.version} is {v.state}; only a certified version can be published "
                    "(run `revreg certify`)"
                )
            if "published" not in TRANSITIONS[v.state]:
                self._transition(s, v, "published")
            if self._revoked(s, [v.signer_keyid]) is not None:
                raise SignatureError(f"{v.behavior.name}:{v.version} is signed by a revoked key")
            self._gate(s, v)
            self._transition(s, v, "published")
            audit.append(s, self.actor, "version.publish", f"{v.behavior.name}:{v.version}", {"digest": v.digest})
            return self._info(s, v)

    def yank(self, ref: Ref | str, reason: str) -> VersionInfo:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if not reason.strip():
            raise InputError("yank needs a --reason")
        with self.transaction() as s:
            v = self._locked(s, ref)
            self._transition(s, v, "yanked")
            v.yank_reason = reason
            audit.append(s, self.actor, "version.yank", f"{v.behavior.name}:{v.version}", {"reason": reason})
            return self._info(s, v)

    def tag(self, ref: Ref | str, tag: str, allow_downgrade: bool = False) -> VersionInfo:
        """Point a tag at a version. Moving a tag to a version pushed before the one it points at
        is a downgrade (a rollback attack on `latest`), refused unless explicitly allowed."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if not VERSION_RE.fullmatch(tag):
            raise InputError(f"invalid tag {tag!r}: use letters, digits, '.', '_', '+' or '-'")
        with self.transaction() as s:
            v = self.find_version(s, ref)
            if s.scalars(
                select(Version.id).where(Version.behavior_id == v.behavior_id, Version.version == tag)
            ).first():
                raise InputError(f"{tag!r} is a version of {v.behavior.name}; a tag cannot shadow it")
            if v.state == "yanked":
                raise StateError(f"{v.behavior.name}:{v.version} is yanked; it cannot be tagged")
            # Create the tag if it is new (a racing writer may create it first), then lock it, so
            # concurrent moves of one tag serialize instead of colliding.
            created = _insert(
                s,
                Tag,
                {"behavior_id": v.behavior_id, "tag": tag, "version_id": v.id, "updated_at": _now()},
                ["behavior_id", "tag"],
            )
            row = s.scalars(select(Tag).where(Tag.behavior_id == v.behavior_id, Tag.tag == tag).with_for_update()).one()
            previous = None
            if not created:
                current = s.get_one(Version, row.version_id)
                previous = current.version
                downgrade = (v.pushed_at, v.id) < (current.pushed_at, current.id)
                if downgrade and not allow_downgrade:
                    raise StateError(
                        f"moving {v.behavior.name}:{tag} from {current.version} back to the older {v.version} is a "
                        "downgrade; pass --allow-downgrade if that is intended"
                    )
                row.version_id, row.updated_at = v.id, _now()
            s.flush()
            details: dict[str, Any] = {"version": v.version, "previous": previous}
            if allow_downgrade and previous is not None:
                details["downgrade_allowed"] = True
            audit.append(s, self.actor, "tag.set", f"{v.behavior.name}:{tag}", details)
            return self._info(s, v)

    # -- pull --------------------------------------------------------------------------------
    def check_pull(self, ref: Ref | str, allow_unpublished: bool = False, allow_yanked: bool = False) -> VersionInfo:
        """Everything a version must satisfy before its bytes may leave the registry. A yanked
        version needs its own flag (unpublished is not enough), and each such pull is audited."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.reading() as s:
            v = self.find_version(s, ref)
            info = self._info(s, v)
            if info.state == "yanked" and not allow_yanked:
                raise StateError(
                    f"{info.ref} was yanked ({info.yank_reason}); pass --allow-yanked to pull it anyway (audited)"
                )
            if info.state not in ("published", "yanked") and not allow_unpublished:
                raise StateError(
                    f"{info.ref} is {info.state}, not published (pass --allow-unpublished to pull it anyway)"
                )
            if info.signer_revoked:
                raise SignatureError(f"{info.ref} is signed by revoked key {info.signer_name} ({info.signer_keyid})")
            if info.state == "published":
                self._gate(s, v)
        if info.state == "yanked":
            with self.transaction() as s:
                audit.append(s, self.actor, "version.pull-yanked", info.ref, {"digest": info.digest})
        return info

    def pull(
        self,
        ref: Ref | str,
        dest: Path,
        fmt: str = "safetensors",
        allow_unpublished: bool = False,
        allow_yanked: bool = False,
    ) -> VersionInfo:
        """Copy a version out, checking digest, signature and certification before anything
        reaches `dest`; `dest` appears complete or not at all."""
        info = self.check_pull(ref, allow_unpublished, allow_yanked)
        check_format(fmt)
        publishers = self.trusted("publisher")
        dest = Path(dest)

        def fill(sink: BinaryIO, tap: Tap) -> str:
            with self.store.open(info.digest) as source, progress.task(f"pull {info.ref}", info.size):
                return copy_hashing(source, sink, durable=True, tap=tap)[0]

        deliver(info, publishers, dest, fmt, fill, "stored blob")
        return info

    # -- probe sets --------------------------------------------------------------------------
    def push_probes(self, path: Path) -> tuple[ProbeSetInfo, bool]:
        """Store a probe set (content-addressed; the same bytes again change nothing)."""

        path = Path(path)
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from exc
        with source, self.store.stage(source) as staged:
            return self.push_probes_staged(staged, str(path))

    def push_probes_staged(self, staged: StagedBlob, label: str) -> tuple[ProbeSetInfo, bool]:
        from revreg.artifacts.probes import read_probes

        with renamed_in_errors(staged.path, label):
            manifest = read_probes(staged.path).manifest
            with self.reading() as s:
                row = s.scalars(select(ProbeSet).where(ProbeSet.digest == staged.digest)).first()
            if row is not None:
                self._restore_blob(staged, f"probes:{row.name}")
                return self._probe_info(row), False
            self.store.commit(staged)
            with self.transaction() as s:
                _insert(s, Blob, {"digest": staged.digest, "size": staged.size, "created_at": _now()}, ["digest"])
                _insert(
                    s,
                    ProbeSet,
                    {
                        "name": manifest.name,
                        "digest": staged.digest,
                        "manifest": json.dumps(manifest.to_dict()),
                        "created_at": _now(),
                    },
                    ["digest"],
                )
                row = s.scalars(select(ProbeSet).where(ProbeSet.digest == staged.digest)).one()
                audit.append(
                    s,
                    self.actor,
                    "probes.push",
                    f"probes:{manifest.name}",
                    {"digest": staged.digest, "count": manifest.count},
                )
                return self._probe_info(row), True

    def probe_sets(self) -> list[ProbeSetInfo]:
        with self.reading() as s:
            return [self._probe_info(r) for r in s.scalars(select(ProbeSet).order_by(ProbeSet.name, ProbeSet.id))]

    def probe_digest(self, ref: str) -> str:
        """The digest of a probe set: NAME (the newest), NAME@sha256:..., or sha256:..."""
        name, _, digest = ref.partition("@")
        if ref.startswith("sha256:"):
            name, digest = "", ref
        with self.reading() as s:
            q = select(ProbeSet)
            if digest:
                q = q.where(ProbeSet.digest == check_digest(digest))
            if name:
                q = q.where(ProbeSet.name == name)
            row = s.scalars(q.order_by(ProbeSet.created_at.desc(), ProbeSet.id.desc())).first()
        if row is None:
            raise NotFound(f"no probe set {ref!r} in the registry (push one with `revreg probes push`)")
        return row.digest

    def fetch_probes(self, ref: str, directory: Path) -> Path:
        """Copy a probe set into `directory`, checking its digest on the way."""
        digest = self.probe_digest(ref)
        out = Path(directory) / f"{digest.split(':')[1][:16]}.probes.safetensors"
        with self.store.open(digest) as source, open(out, "wb") as sink:
            actual, _ = copy_hashing(source, sink)
        if actual != digest:
            out.unlink()
            raise IntegrityError(f"stored probe set {ref} is corrupt (run `revreg fsck`)")
        return out

    @staticmethod
    def _probe_info(row: ProbeSet) -> ProbeSetInfo:
        manifest = json.loads(row.manifest)
        return ProbeSetInfo(
            row.name,
            row.digest,
            manifest["count"],
            row.created_at,
            str(manifest.get("output", "")),
            str(manifest.get("divergence", "")),
        )

    # -- certification queue -----------------------------------------------------------------
    def request_certification(
        self,
        ref: str,
        base: str,
        probes: str,
        factory: str | None = None,
        device: str = "cpu",
        cycles: int = 3,
        baselines: tuple[str, ...] = (),
    ) -> Request:
        from revreg.registry.queue import Queue

        return Queue(self).request(ref, base, probes, factory, device, cycles, baselines)

    def requests(self, state: str | None = None) -> list[Request]:
        from revreg.registry.queue import Queue

        return Queue(self).list(state)

    def claim_request(self, worker: str, lease: float) -> Request | None:
        from revreg.registry.queue import Queue

        return Queue(self).claim(worker, lease)

    def renew_lease(self, request_id: int, worker: str, lease: float) -> bool:
        from revreg.registry.queue import Queue

        return Queue(self).heartbeat(request_id, worker, lease)

    def complete_request(self, request_id: int, worker: str, envelope: bytes | str) -> VersionInfo | None:
        from revreg.registry.queue import Queue

        return Queue(self).complete(request_id, worker, envelope)

    def fail_request(self, request_id: int, worker: str, message: str) -> None:
        from revreg.registry.queue import Queue

        Queue(self).fail(request_id, worker, message)

    # -- integrity ---------------------------------------------------------------------------
    def audit_log(self, subject: str | None = None) -> list[audit.AuditEntryInfo]:
        with self.reading() as s:
            q = select(AuditEntry).order_by(AuditEntry.seq)
            if subject:
                q = q.where(AuditEntry.subject == subject)
            return [audit.info(e) for e in s.scalars(q)]

    def audit_verify(self) -> audit.ChainVerdict:
        with self.reading() as s:
            return audit.verify(s)

    def fsck(self, prune: bool = False, grace: float = DEFAULT_GRACE) -> FsckReport:
        """Check every blob against its digest and every row against its blob. With `prune`,
        delete only what is provably abandoned: an orphan blob or staging file older than `grace`
        seconds that no live writer holds, re-checked against the rows at the moment of deletion.
        A push in flight is never touched, so no acknowledged version can lose its blob."""
        with ExitStack() as stack:
            return self._fsck(stack, prune, grace)

    def _fsck(self, stack: ExitStack, prune: bool, grace: float) -> FsckReport:
        problems: list[str] = []
        warnings: list[str] = []
        with self.reading() as s:
            rows = {b.digest: b.size for b in s.scalars(select(Blob))}
            artifacts = set(s.scalars(select(Version.digest)))  # blobs read as a pull reads them
        on_disk: set[str] = set()
        for name in self.store.digests():
            try:
                on_disk.add(check_digest(name))
            except InputError:
                warnings.append(f"stray object {name!r} in the blob store is not a blob; left alone")
        checked = 0
        damaged: set[str] = set()  # blobs whose bytes or size are wrong
        read: dict[str, Artifact | RevregError | None] = {}  # what each version blob holds
        bar = stack.enter_context(progress.task("fsck: checking blobs", len(on_disk)))
        for digest in sorted(on_disk):
            bar(1)
            actual, size, read[digest] = self._read_blob(digest, digest in artifacts)
            checked += 1
            if actual != digest:
                damaged.add(digest)
                problems.append(f"blob {digest} is corrupt: its bytes hash to {actual}")
            elif digest in rows and rows[digest] != size:
                damaged.add(digest)
                problems.append(f"blob {digest} has {size} bytes, its row says {rows[digest]}")
            elif digest not in rows:
                if not prune:
                    warnings.append(f"blob {digest} has no row (left by an interrupted push, or a push in flight)")
                    continue
                with self.store.orphan(digest, grace) as claim:
                    if claim and not self._has_blob_row(digest) and self.store.remove_orphan(digest, claim):
                        warnings.append(f"blob {digest} had no row (left by an interrupted push): pruned")
                    else:
                        warnings.append(f"blob {digest} has no row yet: younger than the grace period or in use, kept")
        with self.reading() as s:
            rows = {b.digest: b.size for b in s.scalars(select(Blob))}
            versions = list(s.execute(select(Version, Behavior.name).join(Behavior)))
        for digest in sorted(rows.keys() - on_disk):
            if not self.store.exists(digest):
                problems.append(f"blob row {digest} has no file in the store (push the artifact again to restore it)")
        for v, name in versions:
            if v.digest not in rows:
                problems.append(f"version {name}:{v.version} points at {v.digest}, which has no blob row")
            elif v.digest in on_disk and v.digest not in damaged:
                problem = _as_recorded(v, name, read.get(v.digest))
                if problem:
                    problems.append(problem)
        for partial, gone in self.store.stale_staging(grace):
            if prune and gone:
                partial.unlink(missing_ok=True)
                warnings.append(f"staging file {partial.name} left by an interrupted write: pruned")
            else:
                warnings.append(f"staging file {partial.name} (an interrupted write, or one in flight)")
        return FsckReport(checked, len(versions), tuple(problems), tuple(warnings))

    def _read_blob(self, digest: str, as_artifact: bool) -> tuple[str, int, Artifact | RevregError | None]:
        """(sha256, size, what it holds) of a stored blob. A version's blob is read as a pull reads
        it, in the same single pass: header, manifest and envelope parsed, every tensor hashed
        against the signed digest (the artifact, or the error a pull would meet). Only a blob
        that is not an artifact at all is read a second time, for its digest."""
        if not as_artifact:
            with self.store.open(digest) as fh:
                return (*digest_of(fh), None)
        stream = ArtifactStream(f"version blob {digest}")
        try:
            with self.store.open(digest) as fh:
                actual, size = copy_hashing(fh, None, tap=stream)
            return actual, size, stream.finish()
        except RevregError as exc:
            with self.store.open(digest) as fh:
                return (*digest_of(fh), exc)

    def _has_blob_row(self, digest: str) -> bool:
        with self.reading() as s:
            return s.get(Blob, digest) is not None
