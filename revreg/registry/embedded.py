"""`revreg push` and `revreg pull` on an embedded (SQLite) registry, with SQLAlchemy's import off
the critical path.

Importing SQLAlchemy and the SQL registry is most of a push's or a pull's fixed cost
(`benchmarks/bench_startup.py --only sql`, docs/performance.md). Neither needs it to start moving bytes:

- a push's reads before its copy (the publisher keys, whether NAME:VERSION is stored) are
  `registry.reader` statements, run here on `sqlite3` (`Registry.push` runs the same statements
  on its engine's connection); the SQL registry loads on another thread while the file streams
  into staging, and records the version when the stream has ended. A push of a stored version
  never loads it.
- a pull looks up which blob its reference names (`registry.reader`) and streams it into the
  staging file beside the output, with every check of `deliver` on the way, while another thread
  loads the SQL registry and runs `Registry.check_pull` (state, yank, revoked signer,
  certification gate). The output appears only if that check passed and named the same version
  and digest; a refusal stops the copy at its next block and removes the staging file, and is
  reported whatever else went wrong. If the check names another version (the tag moved, say),
  that version is copied and delivered instead, as `Registry.pull` would: checked, then copied.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar

from revreg import progress
from revreg.errors import InputError, IntegrityError
from revreg.registry.api import NotFound, PushResult, VersionInfo
from revreg.registry.delivery import check_format, deliver
from revreg.registry.intake import publisher_keys, push_file
from revreg.registry.reader import (
    PublisherTrust,
    list_versions,
    open_sqlite,
    publisher_trust,
    sqlite_errors,
    store_url,
    version_info,
)
from revreg.registry.refs import Ref, parse_ref
from revreg.registry.store import Tap, copy_hashing, open_store

if TYPE_CHECKING:
    import sqlite3

    from revreg.registry.service import Registry

T = TypeVar("T")


class SqliteCatalog:
    """A push's reads on an embedded registry's database, through sqlite3."""

    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self.conn, self.where = conn, where

    def trust(self) -> PublisherTrust:
        with sqlite_errors(self.where):
            return publisher_trust(self.conn)

    def stored(self, name: str, version: str) -> VersionInfo | None:
        with sqlite_errors(self.where):
            return version_info(self.conn, name, version)

    def hint(self, ref: Ref) -> VersionInfo | None:
        """The version `ref` most likely names (NAME:VERSION, NAME:TAG or NAME@DIGEST), or None
        (a bare NAME, or nothing found): a guess that `Registry.check_pull` confirms."""
        if ref.digest is None and ref.selector is None:
            return None
        with sqlite_errors(self.where):
            if ref.selector is not None:
                found = version_info(self.conn, ref.name, ref.selector)
                if found is not None:
                    return found
            with contextlib.suppress(NotFound):
                versions = list_versions(self.conn, ref.name)
                if ref.digest is not None:
                    return next((v for v in versions if v.digest == ref.digest), None)
                return next((v for v in versions if ref.selector in v.tags), None)
        return None


class _Background(Generic[T]):
    """`work()` on a daemon thread; `result()` waits for it and returns or raises what it did."""

    def __init__(self, work: Callable[[], T], name: str) -> None:
        self._work = work
        self._value: T | None = None
        self._error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        finally:
            self.done.set()

    @property
    def failed(self) -> BaseException | None:
        return self._error if self.done.is_set() else None

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def join(self) -> None:
        self._thread.join()


def _import_sql_registry() -> None:
    # A failure is not reported here: the thread that needs the module imports it again and raises.
    with contextlib.suppress(BaseException):
        import revreg.registry.service  # noqa: F401 - warmed for the recording transaction


def _main_file(rows: Sequence[Any]) -> str | None:
    """The file of the `main` database in `PRAGMA database_list`'s rows (seq, name, file)."""
    return next((str(r[2]) for r in rows if r[1] == "main" and r[2]), None)


class _Moved(Exception):
    """The SQL registry's check named another version than the guess the copy started from."""


class Embedded:
    """An embedded registry opened for `revreg push` / `revreg pull` (see the module's doc)."""

    def __init__(self, location: str, db_file: Path) -> None:
        self.location = location
        self._db_file = db_file
        embedded_dir = db_file.parent if "://" not in location else None
        where = str(embedded_dir or db_file)
        self._conn = open_sqlite(db_file, where)
        with sqlite_errors(where):  # the file this connection opened (registry() runs on other threads)
            self._opened = _main_file(self._conn.execute("PRAGMA database_list").fetchall())
        self.catalog = SqliteCatalog(self._conn, where)
        with sqlite_errors(where):
            url = store_url(self._conn)
        if url is None:
            raise InputError(f"registry at {where} has no blob store configured: run `revreg init`")
        self.store = open_store(url, embedded_dir)
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        self._warm: _Background[None] | None = None
        self._threads: list[_Background[Any]] = []

    def _warm_up(self) -> None:
        if self._warm is None:
            self._warm = _Background(_import_sql_registry, "revreg-import")
            self._threads.append(self._warm)

    def registry(self) -> Registry:
        """The SQL registry (imported on another thread since the first copy began)."""
        with self._lock:
            if self._registry is None:
                if self._warm is not None:
                    self._warm.join()
                from revreg.registry.service import Registry

                registry = Registry.open(self.location)
                # The same database file as the reads before the copy (as each connection opened
                # it), and the same store, or nothing is recorded.
                with registry.engine.connect() as conn:
                    theirs = _main_file(conn.exec_driver_sql("PRAGMA database_list").fetchall())
                mine = self._opened
                if not (theirs and mine and os.path.samefile(theirs, mine)):
                    raise IntegrityError(f"{self.location} opened {theirs} and {mine}; nothing was recorded")
                if registry.store.describe() != self.store.describe():  # both read the same row
                    raise IntegrityError(f"the registry's blob store is not {self.store.describe()}")
                self._registry = registry
            return self._registry

    def push(self, path: Path) -> PushResult:
        return push_file(path, self.catalog, self.store, self.registry, self._warm_up)

    def pull(
        self,
        ref: str,
        dest: Path,
        fmt: str = "safetensors",
        allow_unpublished: bool = False,
        allow_yanked: bool = False,
    ) -> VersionInfo:
        parsed = parse_ref(ref)
        check_format(fmt)
        guess = self.catalog.hint(parsed)
        if guess is None:
            return self.registry().pull(parsed, dest, fmt, allow_unpublished, allow_yanked)
        check = _Background(
            lambda: self.registry().check_pull(parsed, allow_unpublished, allow_yanked), "revreg-check-pull"
        )
        self._threads.append(check)
        publishers = publisher_keys(self.catalog.trust())

        def from_store(info: VersionInfo, confirm: Callable[[], None] | None) -> None:
            def fill(sink: BinaryIO, tap: Tap) -> str:
                def checked(view: memoryview) -> None:
                    if (refused := check.failed) is not None:
                        raise refused  # stop copying what will not be delivered
                    tap(view)

                with self.store.open(info.digest) as source, progress.task(f"pull {info.ref}", info.size):
                    return copy_hashing(source, sink, durable=True, tap=checked)[0]

            deliver(info, publishers, dest, fmt, fill, "stored blob", confirm)

        def confirm() -> None:
            info = check.result()
            if (info.ref, info.digest) != (guess.ref, guess.digest):
                raise _Moved

        try:
            from_store(guess, confirm)
        except BaseException as exc:
            check.join()
            if check.failed is not None:  # the registry's refusal comes first, as without the overlap
                raise check.failed from None
            info = check.result()
            if not isinstance(exc, Exception) or (info.ref, info.digest) == (guess.ref, guess.digest):
                raise
            # The check passed for another version than the guess (a tag moved meanwhile), whatever
            # the guess's copy met: that one is delivered, checked already, as Registry.pull would.
            from_store(info, None)
        return check.result()

    def close(self) -> None:
        self._conn.close()
        for thread in self._threads:  # nothing left running while the interpreter shuts down
            thread.join()
        if self._registry is not None:
            self._registry.engine.dispose()  # its connections closed (SQLite checkpoints its WAL)

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
