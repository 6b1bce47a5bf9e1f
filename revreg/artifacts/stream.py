"""Checking an artifact while its bytes stream past, once.

Push and pull copy an artifact into a staging file; this is the copy's tap (registry.store's
Pipeline hands it every block the copy writes, in order, from the same buffer). It

1. gathers the header from the first bytes, parses it (`artifact_from_header`: canonical form,
   manifest, envelope) and hands the artifact to `on_header`, which verifies the signature (and
   returns the key that made it) or refuses, all before a single tensor byte is hashed;
2. then hashes every tensor's identity chunks (revreg.identity.v1, the scheme the signed
   `tensors_digest` uses, with the algorithm it names) as the data section goes by: tensors
   lie end to end in the order of their offsets (parse_header refuses gaps and overlaps), so
   each block feeds at most a few running chunk hashes;
3. `finish()` checks that the stream ended where the header says and that the tensors hash to
   the signed digest.

So what lands in the staging file is exactly what was checked, and it was read once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revreg.artifacts.artifact import Artifact, artifact_from_header, tensors_algorithm
from revreg.artifacts.identity import (
    CHUNK_SIZE,
    TAG_CHUNK,
    TensorDigest,
    TensorManifest,
    leaf_digest,
    new_hasher,
)
from revreg.artifacts.keys import TrustedKey
from revreg.artifacts.safetensors_io import SMALL_HEADER_BYTES, TensorInfo, parse_header
from revreg.errors import FormatError, IntegrityError


class ArtifactStream:
    """The tap that checks an artifact as it streams (see the module docstring). `where` names
    the artifact in errors (the user's file, "upload", a ref): never a staging path. `size` is
    the stream's length when known (a file, a Content-Length)."""

    def __init__(
        self,
        where: str,
        size: int | None = None,
        on_header: Callable[[Artifact], TrustedKey | None] | None = None,
    ) -> None:
        self.where = where
        self.size = size
        self.on_header = on_header
        self.algorithm = ""  # the one the signed tensors digest names, known once the header is
        self.artifact: Artifact | None = None
        self.signer: TrustedKey | None = None  # what `on_header` returned: the key it verified
        self._prefix = bytearray()
        self._offset = 0  # bytes seen so far
        self._order: list[TensorInfo] = []
        self._index = 0  # the tensor being hashed, in offset order
        self._chunk: Any = None  # the running hash of its current chunk
        self._chunk_left = 0
        self._chunks: list[bytes] = []
        self._leaves: list[TensorDigest] = []

    # -- the tap ---------------------------------------------------------------------------
    def __call__(self, view: memoryview) -> None:
        if self.artifact is None:
            view = self._gather(view)
            if self.artifact is None:
                return
        start = self._offset
        self._offset += len(view)
        header = self.artifact.header
        if self._offset > header.file_size:
            raise FormatError(f"{self.where}: {self._offset - header.file_size}+ bytes after the last tensor")
        position = start - header.data_start  # into the data section
        while len(view):
            info = self._order[self._index]
            if self._chunk is None:
                self._begin_chunk(info, position)
            take = min(len(view), self._chunk_left)
            self._chunk.update(view[:take])
            view = view[take:]
            position += take
            self._chunk_left -= take
            if self._chunk_left == 0:
                self._chunks.append(self._chunk.digest())
                self._chunk = None
                if position == info.end:
                    self._end_tensor(info)
                    self._skip_empty()

    def _gather(self, view: memoryview) -> memoryview:
        """Collect the header; once whole, parse it and run `on_header`. The rest of `view`."""
        take = min(len(view), max(0, 8 - len(self._prefix)))
        self._prefix += view[:take]
        view = view[take:]
        if len(self._prefix) < 8:
            self._offset = len(self._prefix)
            return view
        (n,) = struct.unpack("<Q", self._prefix[:8])
        if n > SMALL_HEADER_BYTES:
            raise FormatError(f"{self.where}: header of {n} bytes is too large (limit {SMALL_HEADER_BYTES})")
        take = min(len(view), 8 + n - len(self._prefix))
        self._prefix += view[:take]
        view = view[take:]
        self._offset = len(self._prefix)
        if len(self._prefix) < 8 + n:
            return view
        header = parse_header(bytes(self._prefix), self.size, self.where, SMALL_HEADER_BYTES)
        self.artifact = artifact_from_header(header, Path(self.where))
        self.algorithm = tensors_algorithm(self.artifact.manifest)
        if self.on_header is not None:
            self.signer = self.on_header(self.artifact)
        self._order = sorted(header.tensors, key=lambda t: (t.start, t.end))
        self._skip_empty()
        return view

    def _begin_chunk(self, info: TensorInfo, position: int) -> None:
        self._chunk = new_hasher(self.algorithm)
        self._chunk.update(TAG_CHUNK)
        self._chunk_left = min(CHUNK_SIZE, info.end - position)

    def _end_tensor(self, info: TensorInfo) -> None:
        leaf = leaf_digest(self.algorithm, info.name, info.dtype, info.shape, info.nbytes, self._chunks)
        self._leaves.append(TensorDigest(info.name, info.dtype, info.shape, info.nbytes, leaf.hex()))
        self._chunks = []
        self._index += 1

    def _skip_empty(self) -> None:
        """Tensors of 0 bytes have no chunks: their leaves are due as soon as they are reached."""
        while self._index < len(self._order) and self._order[self._index].nbytes == 0:
            self._end_tensor(self._order[self._index])

    # -- the verdict -------------------------------------------------------------------------
    def finish(self) -> Artifact:
        """The artifact, once every byte arrived and its tensors hash to the signed digest."""
        if self.artifact is None:
            if len(self._prefix) < 8:
                raise FormatError(f"{self.where}: truncated: {self._offset} bytes is too short for safetensors")
            raise FormatError(f"{self.where}: truncated: the header is cut short after {self._offset} bytes")
        expected = self.artifact.header.file_size
        if self._offset != expected or self._index != len(self._order):
            raise FormatError(f"{self.where}: truncated: {self._offset} of the {expected} bytes its header describes")
        actual = TensorManifest(self.algorithm, tuple(sorted(self._leaves, key=lambda t: t.name.encode()))).identity
        signed = self.artifact.manifest.tensors_digest
        if actual != signed:
            raise IntegrityError(
                f"{self.where}: tensor bytes do not match the signed manifest (expected {signed}, got {actual})"
            )
        return self.artifact
