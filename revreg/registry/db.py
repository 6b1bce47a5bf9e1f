"""Where a registry lives, how to connect to it, and its schema version (Alembic).

A location is a directory (embedded SQLite: DIR/registry.db, blobs in DIR/blobs) or a
SQLAlchemy URL such as postgresql+psycopg://user@host/db.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from revreg.errors import InputError, Unreachable
from revreg.registry.api import SchemaError
from revreg.registry.locate import location_of
from revreg.registry.reader import DB_FILE, HEAD, file_uri, sqlite_errors, unreachable


@dataclass(frozen=True)
class Location:
    url: str
    directory: Path | None  # the embedded registry's directory; None for a server database

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def describe(self) -> str:
        return str(self.directory) if self.directory else _redact(self.url)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database:
        return parsed.database  # the file as the user names it, not %-encoded
    return parsed.render_as_string(hide_password=True)


def resolve(location: str | None) -> Location:
    """A directory or a database URL (`revreg.registry.locate` decides which implementation
    serves a location; an http(s):// URL never reaches here)."""
    raw = location_of(location)
    if "://" in raw:
        if not raw.startswith(("postgresql", "sqlite")):
            raise InputError(f"unsupported registry URL {raw!r}: use a directory or postgresql+psycopg://…")
        if raw.startswith("postgresql://"):
            raw = "postgresql+psycopg://" + raw[len("postgresql://") :]
        return Location(raw, None)
    # The real path, links followed as the OS follows them (SQLAlchemy would normalise
    # `link/../A` as text and open another file than sqlite3 does), then quoted: SQLAlchemy
    # decodes %XX in a URL's database and reads "?" as the start of options, so a directory
    # named reg%41 or reg?x must not open regA or reg. registry.reader.sqlite_file names the
    # same file (tests/test_embedded.py).
    directory = Path(os.path.realpath(raw))
    return Location(f"sqlite:///{file_uri(directory / DB_FILE)}", directory)


def _reason(exc: SQLAlchemyError) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's begin() below own transactions instead of pysqlite's implicit ones.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock at the start, so two writers queue on busy_timeout instead of one
    # failing when it upgrades a read lock (SQLite's classic "database is locked").
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(location: Location) -> Engine:
    if location.is_sqlite:
        engine = create_engine(location.url)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(location.url, pool_pre_ping=True)


@contextmanager
def database_errors(engine: Engine) -> Iterator[None]:
    """SQLAlchemy's errors opening or migrating a database as revreg's: unreachable now (exit 3),
    or not a registry database this revreg can use (exit 2)."""
    try:
        yield
    except OperationalError as exc:
        if isinstance(exc.orig, sqlite3.Error) and not unreachable(exc.orig):  # "table … already exists"
            raise SchemaError(
                f"the database at {_redact(str(engine.url))} is not a revreg registry database: {_reason(exc)}"
            ) from exc
        raise Unreachable(f"cannot reach the registry database at {_redact(str(engine.url))}: {_reason(exc)}") from exc
    except SQLAlchemyError as exc:
        raise SchemaError(
            f"cannot open the registry database at {_redact(str(engine.url))}: {_reason(exc)} "
            "(not a revreg registry database?)"
        ) from exc
    except UnicodeDecodeError as exc:  # SQLite's message about a damaged file is not UTF-8
        raise SchemaError(f"the registry database is damaged ({exc.reason}): not a registry revreg can read") from exc


def current_revision(engine: Engine) -> str | None:
    with database_errors(engine), engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def check_schema(engine: Engine, location: Location) -> None:
    """Refuse to run on a database that is not at this revreg's schema version."""
    revision = current_revision(engine)
    where = location.describe()
    if revision is None:
        raise SchemaError(f"no registry at {where}: create one with `revreg init`")
    if revision != HEAD:
        raise SchemaError(
            f"registry schema at {where} is at revision {revision}, this revreg needs {HEAD}: run `revreg db upgrade` "
            "(it refuses a revision it does not know: a newer revreg's)"
        )


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "revreg:migrations")
    config.attributes["engine"] = engine
    return config


def _sqlite_contents(path: str) -> tuple[str | None, list[str]]:
    """(alembic revision or None, table names) of an SQLite file, read without changing a byte
    (a read-only connection: the engine's own would switch the file to WAL first)."""
    with sqlite_errors(path):
        conn = sqlite3.connect(f"file:{file_uri(path)}?mode=ro", uri=True)
        try:
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            has = "alembic_version" in tables
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone() if has else None
        finally:
            conn.close()
    return (row[0] if row else None), tables


def check_upgradable(engine: Engine) -> str | None:
    """The database's revision, after refusing what `upgrade` must not touch: an SQLite file
    holding another program's tables and no revreg schema (it would be taken over), and a
    revision this revreg does not know (a newer revreg's, or another program's). An existing
    SQLite file is read without being changed."""
    from alembic.script import ScriptDirectory

    where = _redact(str(engine.url))
    if engine.url.get_backend_name() == "sqlite":
        if engine.url.query or not engine.url.database or engine.url.database == ":memory:":
            raise InputError(f"{where}: name the registry's SQLite file plainly (no URL options, not in memory)")
        path = os.path.abspath(engine.url.database)  # the file SQLAlchemy's SQLite dialect opens
        if os.path.exists(path):
            current, tables = _sqlite_contents(path)
        else:
            current, tables = None, []
    else:
        current = current_revision(engine)
        tables = []
        if current is None:
            with database_errors(engine), engine.connect() as conn:
                tables = sorted(inspect(conn).get_table_names())
    if current is None:
        if tables:
            raise SchemaError(
                f"the database at {where} holds other tables ({', '.join(tables[:3])}) and no revreg schema: "
                "not a registry; give revreg a database (or SQLite file) of its own"
            )
        return None
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config(engine)).walk_revisions()}
    if current not in known:
        raise SchemaError(
            f"the registry database at {where} is at revision {current!r}, which this revreg does not know "
            f"(it knows {', '.join(sorted(known))}): made by a newer revreg, or not a revreg database"
        )
    return current


def migrate(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision` (for a caller that ran `check_upgradable` already)."""
    from alembic import command

    with database_errors(engine):
        command.upgrade(alembic_config(engine), revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision`, after `check_upgradable`."""
    check_upgradable(engine)
    migrate(engine, revision)
