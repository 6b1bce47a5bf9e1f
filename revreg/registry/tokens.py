"""API bearer tokens for `revreg serve`: created and revoked on the registry's database, stored
only as sha256 hashes, each with scopes per namespace.

A scope is ACTION:NAMESPACE, ACTION one of read, push, certify, publish, admin; NAMESPACE a
behavior namespace or `*`. A behavior's namespace is its name up to the first dot
("team-a.support-tone" is in "team-a"; "tone" is in "tone"). `admin:*` allows everything.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from revreg.errors import InputError
from revreg.registry import audit
from revreg.registry.api import AuthError, ConflictError, NotFound, ScopeError
from revreg.registry.models import Token
from revreg.registry.service import Registry

ACTIONS = ("read", "push", "certify", "publish", "admin")
_SCOPE = re.compile(r"^(read|push|certify|publish|admin):(\*|[a-z0-9][a-z0-9_-]{0,127})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREFIX = "rvr_"


def namespace(name: str) -> str:
    return name.split(".", 1)[0]


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked: bool

    def allows(self, action: str, name: str | None = None) -> bool:
        """Whether the token may do `action` on behavior `name` (None: registry-wide)."""
        for scope in self.scopes:
            act, ns = scope.split(":", 1)
            if act == "admin" and ns == "*":
                return True
            if act == action and (ns == "*" or (name is not None and ns == namespace(name))):
                return True
        return False

    def reads_something(self) -> bool:
        return any(scope.split(":", 1)[0] in ("read", "admin") for scope in self.scopes)

    def require_some(self, action: str) -> None:
        """`action` on at least one namespace: for what all namespaces share (public keys, bases,
        probe sets), which a team's token needs to pull, gate or push its own behaviors."""
        if not any(scope.split(":", 1)[0] in (action, "admin") for scope in self.scopes):
            raise ScopeError(f"token {self.name!r} has no {action} scope at all (its scopes: {', '.join(self.scopes)})")

    def require(self, action: str, name: str | None = None) -> None:
        if not self.allows(action, name):
            where = f" on namespace {namespace(name)!r}" if name else ""
            raise ScopeError(f"token {self.name!r} has no {action} scope{where} (its scopes: {', '.join(self.scopes)})")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _info(row: Token) -> TokenInfo:
    return TokenInfo(
        row.name, tuple(json.loads(row.scopes)), row.created_at, row.expires_at, row.revoked_at is not None
    )


class Tokens:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(self, name: str, scopes: list[str], expires: timedelta | None = None) -> tuple[str, TokenInfo]:
        """A new token; the secret is returned once and never stored."""
        if not _NAME.fullmatch(name):
            raise InputError(f"invalid token name {name!r}: letters, digits, '.', '_' or '-'")
        if not scopes:
            raise InputError("a token needs at least one --scope, e.g. read:* or push:team-a")
        for scope in scopes:
            if not _SCOPE.fullmatch(scope):
                raise InputError(
                    f"invalid scope {scope!r}: use ACTION:NAMESPACE with ACTION one of "
                    f"{', '.join(ACTIONS)} and NAMESPACE a name or *"
                )
        secret = PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        expires_at = None
        if expires is not None:
            if expires <= timedelta(0):
                raise InputError("--expires must be a positive duration (leave it out for a token that never expires)")
            try:
                expires_at = now + expires
            except OverflowError as exc:
                raise InputError("--expires is too far in the future (past the year 9999)") from exc
        with self.registry.transaction() as s:
            if s.scalars(select(Token.id).where(Token.name == name)).first() is not None:
                raise ConflictError(f"a token named {name!r} already exists: revoke it or pick another name")
            row = Token(
                name=name,
                token_hash=_hash(secret),
                scopes=json.dumps(sorted(set(scopes))),
                created_at=now,
                created_by=self.registry.actor,
                expires_at=expires_at,
            )
            s.add(row)
            audit.append(
                s,
                self.registry.actor,
                "token.create",
                f"token:{name}",
                {"scopes": sorted(set(scopes)), "expires_at": row.expires_at.isoformat() if row.expires_at else None},
            )
        return secret, _info(row)

    def revoke(self, name: str) -> TokenInfo:
        with self.registry.transaction() as s:
            row = s.scalars(select(Token).where(Token.name == name)).first()
            if row is None:
                raise NotFound(f"no token named {name!r}")
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
                audit.append(s, self.registry.actor, "token.revoke", f"token:{name}", {})
            return _info(row)

    def list(self) -> list[TokenInfo]:
        with self.registry.reading() as s:
            return [_info(r) for r in s.scalars(select(Token).order_by(Token.name))]

    def authenticate(self, secret: str | None) -> TokenInfo:
        if not secret:
            raise AuthError("authentication required: send Authorization: Bearer <token>")
        with self.registry.reading() as s:
            row = s.scalars(select(Token).where(Token.token_hash == _hash(secret))).first()
            if row is None:
                raise AuthError("unknown token")
            info = _info(row)
        if info.revoked:
            raise AuthError(f"token {info.name!r} was revoked")
        if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
            raise AuthError(f"token {info.name!r} expired at {info.expires_at.isoformat()}")
        return info
