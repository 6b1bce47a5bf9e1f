"""Strict reading and deterministic writing of safetensors files, as raw bytes (no torch).

Reading validates every offset against the dtype, shape and file size and maps the file so
tensors are seen without copying; writing orders everything so equal inputs give equal bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from revreg.artifacts.canonical import canonical_json, strict_loads
from revreg.artifacts.dtypes import ITEMSIZE
from revreg.errors import FormatError, InputError

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the reference implementation's limit: base model checkpoints
# A behavior or probe set is small: its header (tensor table, manifest, envelope) stays far below
# this, and parsing an attacker's 100 MB header costs seconds and a gigabyte of memory.
SMALL_HEADER_BYTES = 16 << 20
MAX_RANK = 64
MAX_TENSORS = 100_000
_PAGE = mmap.PAGESIZE
# Linux 5.14+: fault a whole range in with one call instead of one fault per few pages
# (about 25% faster hashing here). Python 3.11 has no name for it; older kernels say EINVAL.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform == "linux" else None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `start`/`end` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    tensors: tuple[TensorInfo, ...]  # sorted by name
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    raw: bytes  # the header JSON bytes exactly as stored (padding included)

    @property
    def file_size(self) -> int:
        """The size of the file this header describes: header, then the tensors end to end."""
        return self.data_start + max((t.end for t in self.tensors), default=0)

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise InputError(f"no tensor named {name!r}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _parse_entry(name: str, entry: Any, where: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: tensor {name!r} needs exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise FormatError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape)
    ):
        raise FormatError(
            f"{where}: tensor {name[:60]!r} has a malformed shape (at most {MAX_RANK} dimensions below 2^62)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise FormatError(f"{where}: tensor {name!r} has malformed data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    # Multiply only while the product can still match: a hostile shape never becomes a huge integer.
    expected, overflow = (0 if 0 in info.shape else ITEMSIZE[dtype]), False
    for d in info.shape if expected else ():
        expected *= d
        if expected > 1 << 64:  # no file is that large: stop before the number grows further
            overflow = True
            break
    if info.nbytes != expected:
        need = "more than 2^64" if overflow else str(expected)
        raise FormatError(
            f"{where}: tensor {name[:60]!r} has {info.nbytes} bytes but dtype {dtype} and its shape need {need}"
        )
    return info


def parse_header(prefix: bytes, file_size: int | None, where: str, limit: int = MAX_HEADER_BYTES) -> Header:
    """Validate a header given the file's first 8+N bytes and its total size (None: a stream
    whose size is not known yet; the caller checks it ends where `Header.file_size` says)."""
    if (file_size is not None and file_size < 8) or len(prefix) < 8:
        file_size = len(prefix) if file_size is None else file_size
        raise FormatError(f"{where}: truncated: {file_size} bytes is too short for safetensors")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > limit:
        raise FormatError(f"{where}: header of {n} bytes is too large (limit {limit})")
    if (file_size is not None and 8 + n > file_size) or len(prefix) < 8 + n:
        raise FormatError(f"{where}: truncated: header says {n} bytes but the file is shorter")
    raw = bytes(prefix[8 : 8 + n])
    if not raw.startswith(b"{"):
        raise FormatError(f"{where}: header is not a JSON object")
    doc = strict_loads(raw, f"{where}: header")
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    if len(doc) > MAX_TENSORS:
        raise FormatError(f"{where}: {len(doc)} tensors is over the limit of {MAX_TENSORS}")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    infos = sorted((_parse_entry(k, v, where) for k, v in doc.items()), key=lambda t: t.name)
    position = 0
    for info in sorted(infos, key=lambda t: (t.start, t.end)):
        if info.start != position:
            raise FormatError(
                f"{where}: tensor {info.name!r} starts at {info.start}, expected {position} "
                "(overlapping or gapped data offsets)"
            )
        position = info.end
    data_len = position if file_size is None else file_size - 8 - n
    if position > data_len:
        raise FormatError(f"{where}: truncated: tensors need {position} data bytes, file has {data_len}")
    if position < data_len:
        raise FormatError(f"{where}: {data_len - position} trailing bytes after the last tensor")
    return Header(tuple(infos), dict(metadata), 8 + n, raw)


def read_header(path: Path, limit: int = MAX_HEADER_BYTES) -> Header:
    """The header of a safetensors file; `limit` caps its size before a byte of it is read."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            first = fh.read(8)
            if len(first) == 8:
                (n,) = struct.unpack("<Q", first)
                if n <= limit:
                    first += fh.read(n)
            return parse_header(first, size, str(path), limit)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc


class MappedFile:
    """A safetensors file mapped read-only; `view(info)` returns zero-copy memoryviews."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        self._fh: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        size = os.fstat(self._fh.fileno()).st_size
        self._mm = mmap.mmap(self._fh.fileno(), size, access=mmap.ACCESS_READ)
        self._views: list[memoryview] = []

    def view(self, info: TensorInfo, lo: int = 0, hi: int | None = None) -> memoryview:
        """Bytes [lo, hi) of a tensor's data."""
        base = self.header.data_start + info.start
        hi = info.nbytes if hi is None else hi
        return memoryview(self._mm)[base + lo : base + hi]

    def _pages(self, info: TensorInfo, lo: int, hi: int, inner: bool) -> tuple[int, int]:
        start, end = self.header.data_start + info.start + lo, self.header.data_start + info.start + hi
        if inner:
            return -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        return start // _PAGE * _PAGE, min(-(-end // _PAGE) * _PAGE, len(self._mm))

    def prefetch(self, info: TensorInfo, lo: int, hi: int) -> None:
        """Map these bytes in one call before they are read (a hint; failures are ignored)."""
        if _MADV_POPULATE_READ is None:
            return
        first, last = self._pages(info, lo, hi, inner=False)
        if last > first:
            with contextlib.suppress(OSError):
                self._mm.madvise(_MADV_POPULATE_READ, first, last - first)

    def read(self, info: TensorInfo, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of a tensor, read (not mapped): a file cut short while it is read is an
        InputError here, where touching the mapping would kill the process with SIGBUS."""
        data = os.pread(self._fh.fileno(), hi - lo, self.header.data_start + info.start + lo)
        if len(data) != hi - lo:
            raise InputError(f"{self.path} changed while it was being read (it is shorter than its header says)")
        return data

    def drop(self, info: TensorInfo, lo: int, hi: int) -> None:
        """Tell the kernel we are done with these bytes so they leave our resident set."""
        first, last = self._pages(info, lo, hi, inner=True)
        if last > first:
            self._mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._mm.close()
        self._fh.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WRITE_BLOCK = 4 << 20


@dataclass(frozen=True)
class MappedTensor:
    """A tensor's bytes left where they are, in a mapped file: written and hashed a block at a
    time, each block dropped from memory once used, so packing a large adapter never holds it."""

    file: MappedFile
    info: TensorInfo

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def read(self, lo: int, hi: int) -> bytes:
        return self.file.read(self.info, lo, hi)

    def blocks(self, size: int = WRITE_BLOCK) -> Iterator[bytes]:
        for lo in range(0, self.info.nbytes, size):
            yield self.read(lo, min(lo + size, self.info.nbytes))


TensorData = bytes | memoryview | MappedTensor


def _check_written(fd: int, header: bytes, expect: str, path: Path) -> None:
    from revreg.artifacts.identity import hash_tensors

    written = parse_header(header, len(header) + _data_length(header), str(path))
    sources = [_WrittenSource(fd, written.data_start, info) for info in written.tensors]
    actual = hash_tensors(sources, expect.split(":", 1)[0]).identity
    if actual != expect:
        raise InputError(
            f"the input changed while {path.name} was being written ({actual} != {expect}); nothing was written"
        )


def _data_length(header: bytes) -> int:
    doc = strict_loads(header[8:], "header")
    return max((v["data_offsets"][1] for k, v in doc.items() if k != "__metadata__"), default=0)


class InfoFields:
    """name, dtype, shape and nbytes of a tensor source, read from its `info` (a TensorInfo)."""

    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def nbytes(self) -> int:
        return self.info.nbytes


@dataclass(frozen=True)
class _WrittenSource(InfoFields):
    """A tensor of the file being written, read back through its descriptor."""

    fd: int
    data_start: int
    info: TensorInfo

    def chunk(self, index: int) -> bytes:
        from revreg.artifacts.identity import CHUNK_SIZE

        lo = index * CHUNK_SIZE
        return os.pread(self.fd, min(CHUNK_SIZE, self.info.nbytes - lo), self.data_start + self.info.start + lo)

    def done(self, index: int) -> None:
        return None


def data_nbytes(data: TensorData) -> int:
    return data.nbytes if isinstance(data, MappedTensor) else memoryview(data).nbytes


def encode_header(
    entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None
) -> tuple[bytes, list[str]]:
    """Canonical header for (name, dtype, shape, nbytes) entries; returns (bytes, data order).

    Keys are sorted, tensors are laid out in name order, and the JSON is padded with spaces
    to a multiple of 8 bytes, so the same tensors and metadata always give the same bytes.
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    position = 0
    order = sorted(entries, key=lambda e: e[0])
    for name, dtype, shape, nbytes in order:
        if name == "__metadata__" or name in doc:
            raise InputError(f"duplicate or reserved tensor name {name!r}")
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    body = canonical_json(doc)
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, [e[0] for e in order]


def canonical_header(header: Header) -> bytes:
    """The header bytes revreg's writer would produce for this header's content."""
    encoded, _ = encode_header(((t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors), header.metadata)
    return encoded[8:]


@contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success fsync and rename it into place.

    On any error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"output directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_safetensors(
    path: Path,
    tensors: Mapping[str, tuple[str, tuple[int, ...], TensorData]],
    metadata: dict[str, str] | None = None,
    expect: str | None = None,
) -> None:
    """Write name -> (dtype, shape, raw bytes) deterministically and atomically; tensors left in
    a file are copied a block at a time. With `expect` (the tensors' identity, as signed), the
    written tensors are hashed again before the file takes its name: an input that changed
    between hashing and writing leaves nothing behind."""
    for name, (dtype, shape, data) in tensors.items():
        if dtype not in ITEMSIZE:
            raise InputError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if data_nbytes(data) != _numel(shape) * ITEMSIZE[dtype]:
            raise InputError(f"tensor {name!r}: byte length does not match {dtype} {list(shape)}")
    header, order = encode_header(((n, d, s, data_nbytes(b)) for n, (d, s, b) in tensors.items()), metadata)
    with atomic_output(path) as fh:
        fh.write(header)
        for name in order:
            data = tensors[name][2]
            if isinstance(data, MappedTensor):
                for block in data.blocks():
                    fh.write(block)
            else:
                fh.write(data)
        if expect is not None:
            fh.flush()
            _check_written(fh.fileno(), header, expect, path)
