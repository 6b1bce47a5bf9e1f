"""Content-addressed blob stores. A blob is named by the sha256 of its bytes and becomes
visible only when complete: written to a temporary name, fsynced, checked, renamed."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import queue
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from revreg import progress
from revreg.errors import InputError, IntegrityError

# Small blocks stay in the CPU caches between the stages that touch them (read, sha256, tensor
# hashes, write): 256 KiB blocks make a durable one-pass copy about 1.5x faster here than 4 MiB
# ones, which each stage reads back from memory (benchmarks/bench_pipeline.py, docs/performance.md).
BLOCK = 256 << 10


def aligned_block(size: int = BLOCK) -> mmap.mmap:
    """A writable buffer that starts on a page boundary. The kernel copies file data into it
    several times faster than into a bytearray, whose data starts 16 bytes into its page here
    (`python benchmarks/bench_pipeline.py --only copies`; figures in docs/performance.md)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # never shared with a child


PIPELINE_BLOCKS = 16
LENT_BLOCKS = 8  # loans to a pipeline in flight at once (each up to LEND_BATCH plus one body chunk)
# The server lends uvicorn's body chunks (up to 256,000 bytes each) in batches of this much: each
# loan wakes every stage thread once, and on 2 cores those hand-offs (futex calls, the GIL passed
# between six threads) cost more than the hashing (benchmarks/bench_server.py, docs/performance.md).
LEND_BATCH = 1 << 20
FLUSH_EVERY = 16 << 20  # benchmarks/bench_pipeline.py: 16 and 64 MiB alike, a single fsync at the end 1.3x slower
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
        _a_directory(self.staging_dir)
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
    def stage(self, source: BinaryIO, label: str = "staging", tap: Tap | None = None) -> Iterator[StagedBlob]:
        """Stream `source` into a staging file (hashed, fsynced) in one pass; removed on exit
        unless committed. `tap` sees every block the copy writes (an artifact's checks,
        revreg.artifacts.stream). The file is writer-locked for the whole block, through commit
        and the caller's row."""
        tmp, lock = self.create_staging()
        try:
            with open(tmp, "r+b", buffering=0) as sink, progress.task(label, _size_of(source)):
                digest, size = copy_hashing(source, sink, durable=True, tap=tap)
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


Tap = Callable[[memoryview], None]


class _Loan:
    """Lent bytes (Pipeline.lend): views of one or more chunks, handed to each stage in order."""

    __slots__ = ("views",)

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views


class Pipeline:
    """One pass over a byte stream: each block is written to `sink`, hashed into the file's
    sha256 and handed to `tap` (an artifact's tensor hashing, `revreg.artifacts.stream`), each on
    its own thread and all from the same buffer (hashlib releases the GIL). With `durable`, a
    further thread flushes written data to disk every FLUSH_EVERY bytes, so the disk writes while
    the CPU hashes and the final fsync waits for the last stretch only. Memory stays at
    PIPELINE_BLOCKS blocks whatever the size.

    `algorithms` names the digests to compute ("sha256", "blake3"), each on its own thread: an
    HTTP upload's two ends compare BLAKE3 of the body, which costs a fraction of a sha256 pass.

    A producer takes a free block with `buffer()` (or hands over bytes with `write`), fills it
    and `submit`s it; `close()` returns (the first algorithm's digest, size), and `digests` then
    holds every algorithm's. The first error of any stage is raised to the producer at its next
    call, and the stages stop working on later blocks."""

    def __init__(
        self,
        sink: BinaryIO | None,
        durable: bool = False,
        tap: Tap | None = None,
        block: int | None = None,
        algorithms: tuple[str, ...] = ("sha256",),
    ) -> None:
        self.sink = sink
        self.block = block or BLOCK  # read when called: benchmarks/bench_pipeline.py varies BLOCK
        self.durable = durable and sink is not None
        self.size = 0
        if not algorithms:
            raise ValueError("a pipeline computes at least one digest")
        from revreg.artifacts.identity import new_hasher  # blake3 loads when a pipeline is made, not with this module

        self._hashes = {a: new_hasher(a) for a in algorithms}
        self.digests: dict[str, str] = {}
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(PIPELINE_BLOCKS):
            self._free.put(aligned_block(self.block))
        self._pending: mmap.mmap | None = None
        self._filled = 0
        self._since_flush = 0
        self.flushes = 0  # fdatasync calls made before the final fsync
        self._error: BaseException | None = None
        self._closed = False
        stages: list[Callable[[memoryview], Any]] = [h.update for h in self._hashes.values()]
        if sink is not None:
            stages.append(self._write)
        if tap is not None:
            stages.append(tap)
        self._flushes: queue.Queue[bool | None] = queue.Queue()
        self._flush_thread: threading.Thread | None = None
        if self.durable:
            self._flush_thread = threading.Thread(target=self._flusher, daemon=True, name="revreg-flush")
            self._flush_thread.start()
        self._lock = threading.Lock()
        self._lent = threading.Semaphore(LENT_BLOCKS)
        self._left: dict[int, int] = {}
        self._queues: list[queue.Queue[tuple[Any, int] | None]] = []
        self._threads: list[threading.Thread] = []
        for stage in stages:
            q: queue.Queue[tuple[Any, int] | None] = queue.Queue()
            t = threading.Thread(target=self._run, args=(stage, q), daemon=True, name="revreg-pipeline")
            self._queues.append(q)
            self._threads.append(t)
            t.start()

    @property
    def received(self) -> int:
        """Bytes handed over so far (submitted, or gathered into the block being filled)."""
        return self.size + (self._filled if self._pending is not None else 0)

    def _write(self, view: memoryview) -> None:
        assert self.sink is not None
        n = len(view)
        while len(view):
            written = self.sink.write(view)
            view = view[written if written is not None else len(view) :]
        if self.durable:
            self._since_flush += n
            if self._since_flush >= FLUSH_EVERY:
                self.sink.flush()
                self._flushes.put(True)  # the flusher thread makes it durable while we go on
                self._since_flush = 0

    def _flusher(self) -> None:
        assert self.sink is not None
        fd = self.sink.fileno()
        while self._flushes.get() is not None:
            os.fdatasync(fd)
            self.flushes += 1

    def _run(self, stage: Callable[[memoryview], Any], q: queue.Queue[tuple[Any, int] | None]) -> None:
        while (item := q.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    if isinstance(buf, _Loan):
                        for view in buf.views:
                            stage(view)
                    else:
                        stage(memoryview(buf)[:n])
                except BaseException as exc:  # handed to the producer; the other stages stop too
                    self._error = self._error or exc
            with self._lock:
                self._left[id(buf)] -= 1
                done = self._left[id(buf)] == 0
                if done and isinstance(buf, _Loan):
                    del self._left[id(buf)]
            if done:
                if isinstance(buf, _Loan):
                    self._lent.release()
                else:
                    self._free.put(buf)

    def _raise_stage_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _check(self) -> None:
        if self._closed:  # its stages have stopped: bytes handed over now would be dropped
            raise ValueError("the pipeline is closed")
        self._raise_stage_error()

    def buffer(self) -> mmap.mmap:
        """A free block to fill (waits while every block is in flight)."""
        self._check()
        buf = self._free.get()
        self._check()
        return buf

    def submit(self, buf: mmap.mmap, n: int) -> None:
        if n == 0:
            self._free.put(buf)
            return
        if self._closed:
            raise ValueError("the pipeline is closed")
        with self._lock:
            self._left[id(buf)] = len(self._queues)
        for q in self._queues:
            q.put((buf, n))
        self.size += n
        progress.advance(n)

    def lend(self, data: bytes | Sequence[bytes], wait: bool = True) -> bool:
        """Hand over an immutable bytes object (an HTTP body's chunk), or several in order, as one
        block of their own, not copied: the stages work on them where they are, one wake-up of
        each stage for the lot. At most LENT_BLOCKS loans are in flight; without `wait`, False
        when that many are (call again on a thread, with `wait`)."""
        self._check()
        pieces = (data,) if isinstance(data, bytes) else tuple(data)
        if not all(isinstance(p, bytes) for p in pieces):  # a mutable buffer could change under the stages
            raise TypeError("Pipeline.lend takes bytes objects; hand anything else to write(), which copies it")
        views = [memoryview(p) for p in pieces if p]
        if not views:
            return True
        if not self._lent.acquire(blocking=wait):
            return False
        self._check()
        if self._pending is not None:  # bytes handed over by `write` go first
            self.submit(self._pending, self._filled)
            self._pending = None
        # An object of its own for each loan: the stages count a block by its object, and the same
        # bytes object can be lent twice at once (CPython shares every 1-byte bytes value).
        self.submit(_Loan(views), sum(len(v) for v in views))  # type: ignore[arg-type]
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hand over bytes of any length (an HTTP body's chunks): gathered into whole blocks."""
        view = memoryview(data)
        while len(view):
            if self._pending is None:
                self._pending, self._filled = self.buffer(), 0
            take = min(len(view), self.block - self._filled)
            self._pending[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self.block:
                self.submit(self._pending, self._filled)
                self._pending = None

    def close(self) -> tuple[str, int]:
        """Wait for every stage; fsync a durable sink. (the first algorithm's digest, size), every
        digest in `digests`; raises the first error any stage met."""
        if self._pending is not None:
            self.submit(self._pending, self._filled)
            self._pending = None
        self._stop()
        self._raise_stage_error()
        if self.sink is not None:
            self.sink.flush()
            if self.durable:
                os.fsync(self.sink.fileno())
        self.digests = {a: f"{a}:{h.digest().hex()}" for a, h in self._hashes.items()}
        return next(iter(self.digests.values())), self.size

    def _stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        if self._flush_thread is not None:
            self._flushes.put(None)
            self._flush_thread.join()

    def abort(self) -> None:
        """Stop the stages without a result (the producer failed)."""
        self._stop()


def copy_hashing(
    source: BinaryIO, sink: BinaryIO | None, durable: bool = False, tap: Tap | None = None
) -> tuple[str, int]:
    """Copy `source` into `sink` in one pass (see Pipeline); (sha256 digest, size)."""
    pipe = Pipeline(sink, durable, tap)
    try:
        while True:
            buf = pipe.buffer()
            n = source.readinto(buf)  # type: ignore[attr-defined]
            pipe.submit(buf, n or 0)
            if not n:
                break
    except BaseException:
        pipe.abort()
        raise
    return pipe.close()


def digest_of(source: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    buf = aligned_block()
    view = memoryview(buf)
    while n := source.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
        size += n
    return "sha256:" + h.hexdigest(), size


def _a_directory(path: Path, move_aside: bool = False) -> None:
    """Make `path` a directory. Something else in its place (a file, a link) is moved aside
    under a name fsck reports as a stray object when `move_aside`, else refused in one line."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    if not move_aside:
        raise IntegrityError(f"{path} is not a directory: the blob store is damaged (run `revreg fsck`)")
    os.rename(path, path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.stray"))
    path.mkdir()


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
        for part in (self.root, self.root / "sha256", self.root / "tmp"):
            if part.exists() and not part.is_dir():
                raise InputError(f"{part} exists and is not a directory: it cannot hold the blob store (move it aside)")
        try:
            (self.root / "sha256").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the blob store at {self.root}: {exc.strerror}") from exc

    def path(self, digest: str) -> Path:
        hexpart = check_digest(digest).split(":", 1)[1]
        return self.root / "sha256" / hexpart[:2] / hexpart

    def commit(self, staged: StagedBlob) -> None:
        final = self.path(staged.digest)
        _a_directory(final.parent, move_aside=True)
        os.chmod(staged.path, 0o444)
        try:
            planted = os.lstat(final)
        except FileNotFoundError:
            planted = None
        if planted is not None and stat.S_ISDIR(planted.st_mode):
            # Something that is not a blob sits where this one belongs (a directory cannot be
            # replaced): moved aside under a name fsck reports as a stray object, never deleted.
            os.rename(final, final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.stray"))
        os.replace(staged.path, final)
        fsync_dir(final.parent)

    def open(self, digest: str) -> BinaryIO:
        try:
            # Never block on a FIFO or follow a link planted where a blob belongs.
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise IntegrityError(f"blob {digest} is missing from the store at {self.root}: run `revreg fsck`") from exc
        except OSError as exc:
            raise IntegrityError(
                f"blob {digest} in the store at {self.root} cannot be read ({exc.strerror}): run `revreg fsck`"
            ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IntegrityError(f"blob {digest} in the store at {self.root} is not a regular file: run `revreg fsck`")
        return os.fdopen(fd, "rb")

    def exists(self, digest: str) -> bool:
        """A regular file under the digest's name (a link, directory or FIFO there is no blob)."""
        try:
            return stat.S_ISREG(os.lstat(self.path(digest)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

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
