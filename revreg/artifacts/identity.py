"""Identity hashing: the digest of a set of named tensors, independent of how they are stored.

The scheme (docs/spec/identity.md) hashes each tensor's name, dtype, shape and raw bytes in
fixed-size chunks, then a root over the sorted per-tensor leaves. Chunks hash in parallel.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NewType, Protocol

import blake3

from revreg.artifacts.dtypes import ITEMSIZE
from revreg.errors import FormatError, InputError

Identity = NewType("Identity", str)  # "<algorithm>:<64 hex>"

ALGORITHMS = ("sha256", "blake3")
# Part of the scheme, never a runtime knob: changing it changes every identity.
CHUNK_SIZE = 1 << 24
TAG_CHUNK = b"revreg.identity.v1.chunk\x00"
TAG_TENSOR = b"revreg.identity.v1.tensor\x00"
TAG_ROOT = b"revreg.identity.v1.root\x00"

_IDENTITY_RE = re.compile(r"^(sha256|blake3):[0-9a-f]{64}$")


class Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...
    def digest(self) -> bytes: ...


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        return blake3.blake3()
    raise InputError(f"unknown hash algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")


def parse_identity(text: str) -> Identity:
    if not _IDENTITY_RE.fullmatch(text):
        raise InputError(f"{text!r} is not an identity (expected sha256:<64 hex> or blake3:<64 hex>)")
    return Identity(text)


def looks_like_identity(text: str) -> bool:
    return bool(_IDENTITY_RE.fullmatch(text))


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def chunk_count(nbytes: int) -> int:
    return -(-nbytes // CHUNK_SIZE)


def chunk_digest(algorithm: str, data: Any) -> bytes:
    h = new_hasher(algorithm)
    h.update(TAG_CHUNK)
    h.update(data)
    return h.digest()


def leaf_digest(
    algorithm: str,
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    nbytes: int,
    chunks: Iterable[bytes],
) -> bytes:
    h = new_hasher(algorithm)
    h.update(TAG_TENSOR + _str(name) + _str(dtype) + struct.pack("<I", len(shape)))
    h.update(b"".join(struct.pack("<Q", d) for d in shape))
    h.update(struct.pack("<Q", nbytes))
    for c in chunks:
        h.update(c)
    return h.digest()


def root_digest(algorithm: str, leaves: Iterable[tuple[str, bytes]]) -> bytes:
    ordered = sorted(leaves, key=lambda item: item[0].encode("utf-8"))
    h = new_hasher(algorithm)
    h.update(TAG_ROOT + struct.pack("<Q", len(ordered)))
    for name, leaf in ordered:
        h.update(_str(name) + leaf)
    return h.digest()


@dataclass(frozen=True)
class TensorDigest:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str  # hex of the leaf digest


@dataclass(frozen=True)
class ManifestDiff:
    missing: tuple[str, ...]  # in the expected manifest, not in the actual one
    extra: tuple[str, ...]  # in the actual manifest only
    changed: tuple[str, ...]  # in both, with different dtype, shape or bytes

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.changed)

    def describe(self, limit: int = 5) -> str:
        parts = []
        for label, names in (("missing", self.missing), ("extra", self.extra), ("changed", self.changed)):
            if names:
                shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
                parts.append(f"{len(names)} {label}: {shown}")
        return "; ".join(parts) or "no differences"


@dataclass(frozen=True)
class TensorManifest:
    """Per-tensor digests of a model or behavior; `identity` is the root over them."""

    algorithm: str
    tensors: tuple[TensorDigest, ...]  # sorted by name

    @property
    def identity(self) -> Identity:
        root = root_digest(self.algorithm, ((t.name, bytes.fromhex(t.digest)) for t in self.tensors))
        return Identity(f"{self.algorithm}:{root.hex()}")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def diff(self, actual: TensorManifest) -> ManifestDiff:
        if actual.algorithm != self.algorithm:
            raise InputError(f"cannot compare a {self.algorithm} manifest with a {actual.algorithm} one")
        mine = {t.name: t for t in self.tensors}
        theirs = {t.name: t for t in actual.tensors}
        return ManifestDiff(
            missing=tuple(sorted(mine.keys() - theirs.keys())),
            extra=tuple(sorted(theirs.keys() - mine.keys())),
            changed=tuple(sorted(n for n in mine.keys() & theirs.keys() if mine[n] != theirs[n])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "algorithm": self.algorithm,
            "chunk_size": CHUNK_SIZE,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "digest": t.digest}
                for t in self.tensors
            ],
        }

    @classmethod
    def from_dict(cls, doc: Any) -> TensorManifest:
        if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
            raise FormatError("malformed tensor manifest: expected an object with a list of tensors")
        if not doc["tensors"]:
            raise FormatError("malformed tensor manifest: it lists no tensors")
        for t in doc["tensors"]:
            _check_entry(t)
        names = [t["name"] for t in doc["tensors"]]
        if len(set(names)) != len(names):
            raise FormatError("malformed tensor manifest: a tensor name appears twice")
        try:
            manifest = cls(
                algorithm=doc["algorithm"],
                tensors=tuple(
                    sorted(
                        (
                            TensorDigest(t["name"], t["dtype"], tuple(t["shape"]), t["nbytes"], t["digest"])
                            for t in doc["tensors"]
                        ),
                        key=lambda t: t.name.encode("utf-8"),
                    )
                ),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"malformed tensor manifest ({exc!r})") from exc
        if manifest.algorithm not in ALGORITHMS or doc.get("chunk_size") != CHUNK_SIZE:
            raise FormatError("tensor manifest has an unknown algorithm or chunk size")
        if "identity" in doc and doc["identity"] != manifest.identity:
            raise FormatError("tensor manifest's identity does not match its tensors")
        return manifest


_HEX = frozenset("0123456789abcdef")


def _check_entry(t: Any) -> None:
    """One tensor of a manifest sent by someone else (a client registering a base): every field
    of the type and range the identity scheme hashes, or a FormatError naming it."""
    if not isinstance(t, dict):
        raise FormatError("malformed tensor manifest: a tensor entry is not an object")
    name, dtype, shape, nbytes, digest = (t.get(k) for k in ("name", "dtype", "shape", "nbytes", "digest"))
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise FormatError("malformed tensor manifest: a tensor name must be a string of 1 to 1024 characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError("malformed tensor manifest: a tensor name is not valid Unicode text") from exc
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise FormatError(f"malformed tensor manifest: {name[:60]!r} has an unknown dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape)
    ):
        raise FormatError(f"malformed tensor manifest: shape of {name[:60]!r} must be a list of non-negative integers")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 1 << 62:
        raise FormatError(f"malformed tensor manifest: nbytes of {name[:60]!r} must be a non-negative integer")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise FormatError(f"malformed tensor manifest: digest of {name[:60]!r} must be 64 lowercase hex digits")


class TensorSource(Protocol):
    """One tensor's bytes, served in CHUNK_SIZE pieces, possibly from several threads."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...

    def chunk(self, index: int) -> Any:
        """Bytes of chunk `index` as a buffer (memoryview, bytes or a numpy array)."""
        ...

    def done(self, index: int) -> None:
        """Chunk `index` has been hashed; its memory may be released."""
        ...


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hash_tensors(
    sources: Iterable[TensorSource],
    algorithm: str = "sha256",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> TensorManifest:
    """Hash every chunk of every tensor on a thread pool (hashlib and blake3 release the GIL).

    At most 2 x workers chunks are in flight, so memory stays bounded for sources that copy
    (GPU tensors streamed to the host) whatever the model size.
    """
    new_hasher(algorithm)
    workers = workers or default_workers()
    items = list(sources)
    names = [s.name for s in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"duplicate tensor names: {', '.join(dup[:5])}")
    slots = threading.BoundedSemaphore(2 * workers)

    def work(source: TensorSource, index: int) -> bytes:
        try:
            digest = chunk_digest(algorithm, source.chunk(index))
            source.done(index)
            if progress is not None:
                progress(min(CHUNK_SIZE, source.nbytes - index * CHUNK_SIZE))
            return digest
        finally:
            slots.release()

    futures: list[list[Future[bytes]]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="revreg-hash") as pool:
        try:
            for source in items:
                row = []
                for index in range(chunk_count(source.nbytes)):
                    slots.acquire()
                    row.append(pool.submit(work, source, index))
                futures.append(row)
            digests = [[f.result() for f in row] for row in futures]
        except BaseException:
            for row in futures:
                for f in row:
                    f.cancel()
            raise
    tensors = tuple(
        sorted(
            (
                TensorDigest(
                    s.name,
                    s.dtype,
                    tuple(s.shape),
                    s.nbytes,
                    leaf_digest(algorithm, s.name, s.dtype, tuple(s.shape), s.nbytes, d).hex(),
                )
                for s, d in zip(items, digests, strict=True)
            ),
            key=lambda t: t.name.encode("utf-8"),
        )
    )
    return TensorManifest(algorithm, tensors)


@dataclass
class BufferSource:
    """A tensor whose bytes are already in memory (artifact tensors, test vectors)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def chunk(self, index: int) -> memoryview:
        flat = self.data.cast("B") if self.data.format != "B" else self.data
        return flat[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]

    def done(self, index: int) -> None:
        return None
