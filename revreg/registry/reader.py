"""Registry reads through the database driver alone (no SQLAlchemy): the listing, and what a
push must know before it copies a byte (the store, the publisher keys, the stored version).

`revreg ls` is the command people run most, and importing SQLAlchemy costs about nine times
Python's own start-up on our machines (docs/performance.md), so these reads are SQL statements
run on a DB-API connection: `sqlite3` for an embedded registry, or the connection SQLAlchemy's
engine holds (`Registry.ls`, `Registry.signed_by`, `Registry.push`, any backend). Both paths run
this module's code, so they cannot disagree; tests/test_reader.py compares them on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import operator
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from revreg.errors import InputError, Unreachable
from revreg.registry.api import NotFound, SchemaError, VersionInfo

# The newest migration in revreg/migrations/versions; tests/test_migrations.py keeps them equal.
HEAD = "0003"
DB_FILE = "registry.db"

_KEYS = "SELECT keyid, name, revoked_at FROM keys ORDER BY id"
_TAGS = "SELECT version_id, tag FROM tags"
_VERSIONS = (
    "SELECT v.id, b.name, v.version, v.digest, v.size, v.state, v.base_identity, v.signer_keyid, "
    "v.pushed_at, v.pushed_by, v.yank_reason FROM versions v JOIN behaviors b ON b.id = v.behavior_id"
)
_ORDER = operator.itemgetter(1, 8, 0)  # behavior name, push time, row id


def utc(value: Any) -> datetime:
    """A stored timestamp as an aware UTC datetime: SQLite returns the text SQLAlchemy wrote
    (UTC, no zone), PostgreSQL an aware datetime."""
    if type(value) is str:
        try:  # the common case: parsing with the zone appended is five times quicker than replace()
            return datetime.fromisoformat(value + "+00:00")
        except ValueError:
            with contextlib.suppress(ValueError):  # text that carries its own zone; else refused below
                value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise SchemaError(f"the registry database holds a timestamp that is not one: {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _placeholder(conn: Any) -> str:
    return "?" if getattr(type(conn), "__module__", "").startswith("sqlite3") else "%s"


def list_versions(conn: Any, name: str | None = None, version: str | None = None) -> list[VersionInfo]:
    """Every version (or NAME's, or NAME:VERSION alone), ordered by behavior then push time, as
    `Registry.ls` returns them. `conn` is a DB-API connection; the caller owns its transaction."""
    placeholder = _placeholder(conn)
    cur = conn.cursor()
    try:
        names: dict[str, str] = {}
        revoked: set[str] = set()
        cur.execute(_KEYS)
        for keyid, key_name, revoked_at in cur.fetchall():
            names.setdefault(keyid, key_name)
            if revoked_at is not None:
                revoked.add(keyid)
        tags: dict[int, list[str]] = {}
        cur.execute(_TAGS)
        for version_id, tag in cur.fetchall():
            tags.setdefault(version_id, []).append(tag)
        if name is None:
            cur.execute(_VERSIONS)
        elif version is None:
            cur.execute(_VERSIONS + f" WHERE b.name = {placeholder}", (name,))
        else:
            cur.execute(_VERSIONS + f" WHERE b.name = {placeholder} AND v.version = {placeholder}", (name, version))
        rows = cur.fetchall()
    finally:
        cur.close()
    # Every text column must hold text (SQLite stores whatever it is given); checked in one sweep.
    text = {type(v) for r in rows for v in (r[1], r[2], r[3], r[5], r[6], r[7], r[9])}
    text |= {type(t) for ts in tags.values() for t in ts} | {type(n) for n in names.values()}
    text |= {type(r[10]) for r in rows} - {type(None)}
    if text - {str}:
        raise SchemaError("the registry database holds a value of the wrong type where text belongs")
    if {type(r[4]) for r in rows} - {int} or any(not 0 <= r[4] < 1 << 63 for r in rows):
        raise SchemaError("the registry database holds a version size that is not a byte count")
    try:
        out = _infos(rows, names, revoked, tags)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(f"the registry database holds a value of the wrong type ({exc})") from exc
    if name is not None and version is None and not out:
        raise NotFound(f"no behavior named {name!r}")
    return out


def version_info(conn: Any, name: str, version: str) -> VersionInfo | None:
    """NAME:VERSION as `Registry.resolve` describes it (no tags), or None if it is not stored."""
    found = list_versions(conn, name, version)
    return found[0] if found else None


def store_url(conn: Any) -> str | None:
    """The blob store the registry records (`revreg init` wrote it)."""
    cur = conn.cursor()
    try:
        cur.execute(f"SELECT value FROM settings WHERE key = {_placeholder(conn)}", ("store",))
        row = cur.fetchone()
    finally:
        cur.close()
    if row is not None and type(row[0]) is not str:
        raise SchemaError("the registry database holds a value of the wrong type where text belongs")
    return row[0] if row else None


@dataclass(frozen=True)
class PublisherTrust:
    """The keys a push's signature is checked against, read once: unrevoked publisher keys
    (keyid -> (name, public PEM)) and every revoked key id, in any role (keyid -> (name,
    reason)). The transaction that records a version checks revocation again."""

    publishers: dict[str, tuple[str, str]]
    revoked: dict[str, tuple[str, str]]


def publisher_trust(conn: Any) -> PublisherTrust:
    cur = conn.cursor()
    try:
        cur.execute(
            "SELECT keyid, name, role, public_pem, revoked_at, revoked_reason FROM keys "
            f"WHERE role = {_placeholder(conn)} OR revoked_at IS NOT NULL ORDER BY id",
            ("publisher",),
        )
        rows = cur.fetchall()
    finally:
        cur.close()
    text = {type(v) for r in rows for v in (r[0], r[1], r[2], r[3])} | ({type(r[5]) for r in rows} - {type(None)})
    if text - {str}:
        raise SchemaError("the registry database holds a value of the wrong type where text belongs")
    publishers: dict[str, tuple[str, str]] = {}
    revoked: dict[str, tuple[str, str]] = {}
    for keyid, key_name, role, pem, revoked_at, reason in rows:
        if revoked_at is not None:
            revoked.setdefault(keyid, (key_name, reason or ""))
        elif role == "publisher":
            publishers[keyid] = (key_name, pem)
    return PublisherTrust(publishers, revoked)


def _infos(rows: list[Any], names: dict[str, str], revoked: set[str], tags: dict[int, list[str]]) -> list[VersionInfo]:
    # Ordered here, not by the database: by code point on every backend (PostgreSQL would sort
    # names by its collation), and quicker than SQLite's temporary sort tree.
    rows.sort(key=_ORDER)
    sorted_tags = {version_id: tuple(sorted(t)) for version_id, t in tags.items()}
    return [
        VersionInfo(
            behavior,
            version,
            digest,
            int(size),
            state,
            base,
            signer,
            names.get(signer),
            signer in revoked,
            utc(pushed_at),
            pushed_by,
            sorted_tags.get(version_id, ()),
            yank_reason,
        )
        for version_id, behavior, version, digest, size, state, base, signer, pushed_at, pushed_by, yank_reason in rows
    ]


# SQLite's result codes for a database that cannot be used now, rather than one that is not a
# registry revreg can read (a table, column, function or collation missing, a broken view, text
# that is not UTF-8): decided by code, never by the message, which can quote names and data.
_UNREACHABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_FULL")


def unreachable(exc: sqlite3.Error) -> bool:
    """Whether a SQLite error means the database could not be used now (exit 3)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(_UNREACHABLE)


def sqlite_file(location: str) -> Path | None:
    """The database file of an embedded registry location (a directory or sqlite:///FILE);
    None for anything else (a server database, an http(s) registry)."""
    if "://" not in location:
        return Path(os.path.realpath(location)) / DB_FILE  # as db.resolve names it
    if location.startswith("sqlite:///"):
        rest = location[len("sqlite:///") :]
        if rest and "?" not in rest:  # URL options only SQLAlchemy understands: let it handle them
            # %XX decoded and the path normalised as text, as SQLAlchemy's SQLite dialect does.
            return Path(os.path.abspath(unquote(rest)))
    return None


@contextlib.contextmanager
def sqlite_errors(where: str) -> Iterator[None]:
    """SQLite's errors as revreg's: unusable now (exit 3) or not a registry this revreg reads."""
    try:
        yield
    except UnicodeDecodeError as exc:  # SQLite's own message about a damaged file is not UTF-8
        raise SchemaError(f"the database at {where} is damaged ({exc.reason}): not a registry revreg can read") from exc
    except sqlite3.DatabaseError as exc:
        if unreachable(exc):
            raise Unreachable(f"registry database error at {where}: {exc}") from exc
        raise SchemaError(f"the database at {where} is not a registry this revreg can read: {exc}") from exc


def file_uri(path: Path | str) -> str:
    """A path as the %-quoted text of a URL (SQLite's file: URIs, SQLAlchemy's sqlite:///). A
    name that is not UTF-8 cannot be one: refused in one line, not a traceback."""
    try:
        return quote(str(path), safe="/")
    except UnicodeEncodeError as exc:
        shown = str(path).encode("utf-8", "backslashreplace").decode()
        raise InputError(f"{shown}: a registry path must be valid UTF-8; rename it or name another") from exc


def open_sqlite(path: Path, where: str) -> sqlite3.Connection:
    """A read-only-by-use connection to an existing registry database at this revreg's schema
    (never creates a file: `mode=rw`)."""
    if not path.is_file():
        raise InputError(f"no registry at {where}: create one with `revreg init`")
    with sqlite_errors(where):
        conn = sqlite3.connect(f"file:{file_uri(path)}?mode=rw", uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone()
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone() if has else None
    if revision is None:
        conn.close()
        raise SchemaError(f"no registry at {where}: create one with `revreg init`")
    if revision[0] != HEAD:
        conn.close()
        raise SchemaError(
            f"registry schema at {where} is at revision {revision[0]}, this revreg needs {HEAD}: "
            "run `revreg db upgrade` (it refuses a revision it does not know: a newer revreg's)"
        )
    return conn


def ls_sqlite(path: Path, where: str, name: str | None = None) -> list[VersionInfo]:
    """`Registry.ls` on an embedded registry without importing SQLAlchemy: one read
    transaction (a consistent snapshot under WAL)."""
    conn = open_sqlite(path, where)
    try:
        with sqlite_errors(where):
            conn.execute("BEGIN")
            try:
                return list_versions(conn, name)
            finally:
                conn.execute("COMMIT")
    finally:
        conn.close()
