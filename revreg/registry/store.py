"""Content-addressed blob stores. A blob is named by the sha256 of its bytes and becomes
visible only when complete: written to a temporary name, fsynced, checked, renamed."""

from __future__ import annotations

import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from revreg.errors import InputError, IntegrityError

BLOCK = 1 << 20


@dataclass(frozen=True)
class StagedBlob:
    """A blob written to a temporary place: hashed, fsynced, not yet visible."""

    path: Path
    digest: str
    size: int


class BlobStore(ABC):
    @abstractmethod
    @contextmanager
    def stage(self, source: BinaryIO) -> Iterator[StagedBlob]:
        """Stream `source` into a staging file; removed on exit unless committed."""

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
    def describe(self) -> str: ...


def copy_hashing(source: BinaryIO, sink: BinaryIO) -> tuple[str, int]:
    """Copy in blocks, hashing on the way; memory stays at one block whatever the size."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while n := source.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
        sink.write(view[:n])
        size += n
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

    def create(self) -> None:
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexpart = check_digest(digest).split(":", 1)[1]
        return self.root / "sha256" / hexpart[:2] / hexpart

    @contextmanager
    def stage(self, source: BinaryIO) -> Iterator[StagedBlob]:
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "xb") as sink:
                digest, size = copy_hashing(source, sink)
                sink.flush()
                os.fsync(sink.fileno())
            yield StagedBlob(tmp, digest, size)
        finally:
            tmp.unlink(missing_ok=True)

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
        for path in sorted((self.root / "sha256").glob("*/*")):
            yield f"sha256:{path.name}"

    def describe(self) -> str:
        return str(self.root)


def open_store(url: str, base: Path | None) -> BlobStore:
    """A store from its recorded location: a path (relative to the registry directory) or file://."""
    if url.startswith("file://"):
        return FileBlobStore(Path(url[len("file://") :]))
    if "://" in url:
        raise InputError(f"unsupported blob store {url!r}: use a directory")
    path = Path(url)
    return FileBlobStore(path if path.is_absolute() or base is None else base / path)
