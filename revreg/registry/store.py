"""Content-addressed blob stores. A blob is named by the sha256 of its bytes and becomes
visible only when complete: written to a temporary name, fsynced, checked, renamed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from revreg import progress
from revreg.errors import InputError, IntegrityError

BLOCK = 4 << 20
PIPELINE_BLOCKS = 4
FLUSH_EVERY = 64 << 20
# fsck --prune deletes an orphan blob or a staging file only when it is older than this and no
# live writer holds it: a push keeps a shared lock on its file from the first byte until its row
# has committed (the lock follows the file through the rename into the store).
DEFAULT_GRACE = 3600.0
CREATING_GRACE = 3600.0


@contextmanager
def abandoned(path: Path, grace: float) -> Iterator[os.stat_result | None]:
    """Whether `path` is provably abandoned: older than `grace` seconds and locked by no live
    writer: then the locked file's stat (None otherwise). While the caller acts on it, it holds the
    exclusive lock, so no writer can take that file."""
    try:
        # Never block on a FIFO or follow a link someone planted: regular files only.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        yield None
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield st if time.time() - st.st_mtime >= grace and _same_file(path, st) else None
    finally:
        os.close(fd)


def _same_file(path: Path, st: os.stat_result) -> bool:
    """Whether `path` still names the inode we locked (a push may have renamed a new one onto it)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def remove_if_same(path: Path, locked: os.stat_result) -> bool:
    """Delete an orphan under the exclusive lock `abandoned` holds: move it aside first, then
    unlink it only if what moved is the inode that was locked. If a push renamed a fresh copy
    onto the path meanwhile, that copy (same digest, same bytes) is moved back instead."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.prune")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = os.stat(aside, follow_symlinks=False)
    if (moved.st_ino, moved.st_dev) == (locked.st_ino, locked.st_dev):
        aside.unlink()
        return True
    if path.exists():
        aside.unlink()  # yet another copy arrived: the bytes are there
    else:
        os.replace(aside, path)
    return False


@dataclass(frozen=True)
class StagedBlob:
    """A blob written to a temporary place: hashed, fsynced, not yet visible."""

    path: Path
    digest: str
    size: int


class BlobStore(ABC):
    """Blobs by digest. Staging is always a local file, so every check (signature, tensors)
    runs on the exact bytes that `commit` then makes visible."""

    staging_dir: Path

    def create_staging(self) -> tuple[Path, int]:
        """A new, empty staging file, already writer-locked: (its path, the lock's descriptor).

        It is created under a name fsck never considers, locked, and only then renamed to its
        `.partial` name (the lock follows the inode), so fsck can never see a staging file in
        the instant between its creation and its lock."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        creating = self.staging_dir / f"{name}.creating"
        fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        path = self.staging_dir / f"{name}.partial"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.rename(creating, path)
        except BaseException:
            os.close(fd)
            creating.unlink(missing_ok=True)
            raise
        return path, fd

    @contextmanager
    def stage(self, source: BinaryIO, label: str = "staging") -> Iterator[StagedBlob]:
        """Stream `source` into a staging file (hashed, fsynced); removed on exit unless committed.
        The file is writer-locked for the whole block, through commit and the caller's row."""
        tmp, lock = self.create_staging()
        try:
            with open(tmp, "r+b", buffering=0) as sink:
                with progress.task(label, _size_of(source)):
                    digest, size = copy_hashing(source, sink, durable=True)
                os.fsync(sink.fileno())
            yield StagedBlob(tmp, digest, size)
        finally:
            tmp.unlink(missing_ok=True)
            os.close(lock)

    @contextmanager
    def orphan(self, digest: str, grace: float) -> Iterator[Any]:
        """A claim on a blob without a row if it may be deleted now (see `abandoned`), else None."""
        yield None

    def stale_staging(self, grace: float) -> Iterator[tuple[Path, os.stat_result | None]]:
        """Staging files, each with whether it is abandoned (old and unlocked); a True holds the
        lock until the next item is asked for."""
        if not self.staging_dir.is_dir():
            return
        # A `.creating` file lives for microseconds before it is locked and renamed; only one
        # left by a process that died right then (an hour old at least) is abandoned.
        found = [(p, grace) for p in self.staging_dir.glob("*.partial")]
        found += [(p, max(grace, CREATING_GRACE)) for p in self.staging_dir.glob("*.creating")]
        for path, wait in sorted(found):
            if path.is_symlink() or not path.is_file():
                continue  # not a staging file revreg wrote; fsck reports nothing it cannot judge
            with abandoned(path, wait) as gone:
                yield path, gone

    @abstractmethod
    def create(self) -> None:
        """Prepare an empty store (or check that an existing one is reachable)."""

    @abstractmethod
    def commit(self, staged: StagedBlob) -> None:
        """Make a staged blob visible under its digest (idempotent)."""

    @abstractmethod
    def open(self, digest: str) -> BinaryIO: ...

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def digests(self) -> Iterator[str]: ...

    @abstractmethod
    def remove(self, digest: str) -> None:
        """Delete a blob (fsck --prune of orphans only)."""

    def remove_orphan(self, digest: str, claim: Any) -> bool:
        """Delete an orphan `orphan` claimed (while the claim is held)."""
        self.remove(digest)
        return True

    @abstractmethod
    def describe(self) -> str: ...


def _size_of(source: BinaryIO) -> int | None:
    try:
        return os.fstat(source.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return None


def copy_hashing(source: BinaryIO, sink: BinaryIO, durable: bool = False) -> tuple[str, int]:
    """Copy in blocks, hashing on the way; memory stays at a few blocks whatever the size.

    Hashing runs on a second thread while this one reads and writes (hashlib releases the
    GIL). With `durable`, a third thread flushes written data to disk every FLUSH_EVERY bytes,
    so the final fsync waits for the last stretch only instead of the whole file.
    """
    h = hashlib.sha256()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(PIPELINE_BLOCKS):
        free.put(bytearray(BLOCK))
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    flushes: queue.Queue[int | None] = queue.Queue()

    def hasher() -> None:
        while (item := full.get()) is not None:
            buf, n = item
            h.update(memoryview(buf)[:n])
            free.put(buf)

    def flusher() -> None:
        fd = sink.fileno()
        while flushes.get() is not None:
            os.fdatasync(fd)

    threads = [threading.Thread(target=hasher, daemon=True)]
    if durable:
        threads.append(threading.Thread(target=flusher, daemon=True))
    for t in threads:
        t.start()
    size = since_flush = 0
    try:
        while True:
            buf = free.get()
            n = source.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                free.put(buf)
                break
            sink.write(memoryview(buf)[:n])
            full.put((buf, n))
            progress.advance(n)
            size += n
            since_flush += n
            if durable and since_flush >= FLUSH_EVERY:
                sink.flush()
                flushes.put(size)
                since_flush = 0
    finally:
        full.put(None)
        flushes.put(None)
        for t in threads:
            t.join()
    return "sha256:" + h.hexdigest(), size


def digest_of(source: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while n := source.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
        size += n
    return "sha256:" + h.hexdigest(), size


def check_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InputError(f"{digest!r} is not a blob digest (sha256:<64 hex>)")
    return digest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore(BlobStore):
    """Blobs at ROOT/sha256/ab/<hex>; staging files in ROOT/tmp on the same filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging_dir = self.root / "tmp"

    def create(self) -> None:
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexpart = check_digest(digest).split(":", 1)[1]
        return self.root / "sha256" / hexpart[:2] / hexpart

    def commit(self, staged: StagedBlob) -> None:
        final = self.path(staged.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.path, 0o444)
        os.replace(staged.path, final)
        fsync_dir(final.parent)

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError as exc:
            raise IntegrityError(f"blob {digest} is missing from the store at {self.root}: run `revreg fsck`") from exc

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def digests(self) -> Iterator[str]:
        """What lies in the store, as digests; entries that are not a blob where one belongs
        (a directory, a link, a wrong prefix folder) are yielded as their path, which fsck
        reports as a stray object."""
        for path in sorted((self.root / "sha256").glob("*/*")):
            if path.is_file() and not path.is_symlink() and path.parent.name == path.name[:2]:
                yield f"sha256:{path.name}"
            else:
                yield str(path.relative_to(self.root))

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    @contextmanager
    def orphan(self, digest: str, grace: float) -> Iterator[os.stat_result | None]:
        with abandoned(self.path(digest), grace) as claim:
            yield claim

    def remove_orphan(self, digest: str, claim: Any) -> bool:
        return remove_if_same(self.path(digest), claim)

    def describe(self) -> str:
        return str(self.root)


def open_store(url: str, base: Path | None) -> BlobStore:
    """A store from its recorded location: a path (relative to the registry directory) or file://."""
    if url.startswith("file://"):
        return FileBlobStore(Path(url[len("file://") :]))
    if url.startswith("s3://"):
        from revreg.registry.store_s3 import S3BlobStore

        return S3BlobStore.from_url(url)
    if "://" in url:
        raise InputError(f"unsupported blob store {url!r}: use a directory or s3://bucket/prefix")
    path = Path(url)
    return FileBlobStore(path if path.is_absolute() or base is None else base / path)
