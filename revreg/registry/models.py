"""SQLAlchemy 2.x typed models of the registry. ORM rows stay inside `revreg.registry`."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STATES = ("pending", "certified", "rejected", "published", "yanked")
ROLES = ("publisher", "verifier")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores no zone; values come back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime}  # noqa: RUF012 - SQLAlchemy declares it a ClassVar


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class BaseModel(Base):
    """A registered base model: its identity and per-tensor manifest."""

    __tablename__ = "bases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity: Mapped[str] = mapped_column(String(80), unique=True)
    name: Mapped[str | None] = mapped_column(String(128))
    tensor_count: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[str] = mapped_column(Text)  # JSON of TensorManifest.to_dict()
    registered_at: Mapped[datetime] = mapped_column()
    registered_by: Mapped[str] = mapped_column(String(256))


class Key(Base):
    """A public key the registry knows, in one role. Revocation is permanent."""

    __tablename__ = "keys"
    __table_args__ = (UniqueConstraint("keyid", "role", name="uq_keys_keyid_role"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    keyid: Mapped[str] = mapped_column(String(80), index=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    public_pem: Mapped[str] = mapped_column(Text)
    added_at: Mapped[datetime] = mapped_column()
    added_by: Mapped[str] = mapped_column(String(256))
    revoked_at: Mapped[datetime | None] = mapped_column()
    revoked_reason: Mapped[str | None] = mapped_column(Text)


class Blob(Base):
    """A blob fully present in the store; inserted only after it was written and renamed."""

    __tablename__ = "blobs"
    digest: Mapped[str] = mapped_column(String(80), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column()


class Behavior(Base):
    __tablename__ = "behaviors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column()
    versions: Mapped[list[Version]] = relationship(back_populates="behavior")


class Version(Base):
    """One immutable version of a behavior: an artifact blob plus its lifecycle state."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("behavior_id", "version", name="uq_versions_behavior_id_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    behavior_id: Mapped[int] = mapped_column(ForeignKey("behaviors.id"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    base_identity: Mapped[str] = mapped_column(String(80), index=True)
    signer_keyid: Mapped[str] = mapped_column(String(80))
    manifest: Mapped[str] = mapped_column(Text)  # the signed manifest JSON, as packed
    state: Mapped[str] = mapped_column(String(16))
    yank_reason: Mapped[str | None] = mapped_column(Text)
    pushed_at: Mapped[datetime] = mapped_column()
    pushed_by: Mapped[str] = mapped_column(String(256))
    behavior: Mapped[Behavior] = relationship(back_populates="versions")


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("behavior_id", "tag", name="uq_tags_behavior_id_tag"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    behavior_id: Mapped[int] = mapped_column(ForeignKey("behaviors.id"))
    tag: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    updated_at: Mapped[datetime] = mapped_column()


class ProbeSet(Base):
    __tablename__ = "probe_sets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), unique=True)
    manifest: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()


class Certification(Base):
    """A signed verifier attestation about one version (a DSSE envelope, stored verbatim)."""

    __tablename__ = "certifications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    verifier_keyid: Mapped[str] = mapped_column(String(80))
    passed: Mapped[bool] = mapped_column(Boolean)
    envelope: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()


class AuditEntry(Base):
    """Append-only, hash-chained log of every state change."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(40))  # ISO 8601 UTC, hashed as stored
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Token(Base):
    """An API bearer token for `revreg serve`: only its sha256 is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(Text)  # JSON list of "action:namespace"
    created_at: Mapped[datetime] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(256))
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class CertRequest(Base):
    """A queued certification: claimed by one worker at a time under a lease that expires."""

    __tablename__ = "cert_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    ref: Mapped[str] = mapped_column(String(256))
    base: Mapped[str] = mapped_column(Text)  # the base model's path as the workers see it
    factory: Mapped[str | None] = mapped_column(String(256))
    probes: Mapped[str] = mapped_column(String(512))
    device: Mapped[str] = mapped_column(String(32))
    cycles: Mapped[int] = mapped_column(Integer)
    baselines: Mapped[str] = mapped_column(Text)  # JSON list
    state: Mapped[str] = mapped_column(String(16), index=True)  # queued, running, done, failed
    requested_by: Mapped[str] = mapped_column(String(256))
    requested_at: Mapped[datetime] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    result: Mapped[str | None] = mapped_column(Text)
