"""A push of a local file, in the order that reads each byte once (docs/performance.md).

1. The header is parsed from the file and its signature checked against the publisher keys
   before a byte is copied.
2. If NAME:VERSION is stored already, one pass with nothing written decides: the file's digest
   (the same bytes: "already present"; other bytes: a conflict) and its tensors (damage is named
   as damage).
3. Otherwise one pass copies the file into the store's staging area while the file's digest and
   every tensor's digest are computed from the same buffers (registry.store.Pipeline), and the
   SQL registry records the version (`Registry.push_streamed`), checking revocation, shadowing
   and conflicts again in its transaction.

The reads of steps 1 and 2 go through `registry.reader`, on any DB-API connection. `Registry.push`
runs this code on its engine's connection; `revreg push` on an embedded registry runs the same
reads on `sqlite3` (`registry.embedded`) and streams the file while SQLAlchemy, which only step 3
needs, is still being imported on another thread. Nothing here imports SQLAlchemy.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

from revreg.artifacts.artifact import Artifact, open_artifact, verify_signature
from revreg.artifacts.keys import TrustedKey, load_public_pem
from revreg.artifacts.stream import ArtifactStream
from revreg.errors import InputError, IntegrityError, SignatureError, UnknownKeyError
from revreg.registry.api import PushResult, VersionInfo, same_bytes
from revreg.registry.reader import PublisherTrust
from revreg.registry.store import BlobStore, StagedBlob, copy_hashing


class Catalog(Protocol):
    """The reads a push makes before it copies anything."""

    def trust(self) -> PublisherTrust: ...
    def stored(self, name: str, version: str) -> VersionInfo | None: ...


class Recorder(Protocol):
    """What records checked, staged bytes as a version (the SQL registry)."""

    def push_streamed(self, staged: StagedBlob, stream: ArtifactStream) -> PushResult: ...


def publisher_keys(trust: PublisherTrust) -> Mapping[str, TrustedKey]:
    return {
        keyid: TrustedKey(name, keyid, load_public_pem(pem.encode(), name))
        for keyid, (name, pem) in trust.publishers.items()
    }


def check_signer(trust: PublisherTrust, artifact: Artifact, label: str) -> TrustedKey:
    """The trusted, unrevoked publisher key that signed `artifact` (from its header alone)."""
    for sig in artifact.envelope.signatures:
        if sig.keyid in trust.revoked:
            name, reason = trust.revoked[sig.keyid]
            raise SignatureError(f"{label} is signed by revoked key {name} ({sig.keyid}): {reason}")
    try:
        return verify_signature(artifact, publisher_keys(trust))
    except UnknownKeyError as exc:
        raise UnknownKeyError(f"{exc}: trust the signer with `revreg keys trust KEY --role publisher`") from exc


def push_file(
    path: Path,
    catalog: Catalog,
    store: BlobStore,
    recorder: Callable[[], Recorder],
    copying: Callable[[], None] | None = None,
) -> PushResult:
    """Push the file at `path` (steps 1-3 above). `copying()` runs just before the copy into
    staging starts, and `recorder()` once it has ended; neither runs for a version already
    stored whose blob is in place."""
    path = Path(path)
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    with source:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode):
            # A pipe can be read only once and has no size: its header is checked as it streams
            # (as a server upload is), with no existence check before the copy.
            trust = catalog.trust()
            stream = ArtifactStream(str(path), None, lambda a: check_signer(trust, a, str(path)))
            return _stream_in(source, path, stream, store, recorder, copying)
        planned = open_artifact(path)
        signer = check_signer(catalog.trust(), planned, str(path))
        m = planned.manifest

        def same_header(streamed: Artifact) -> TrustedKey:
            if streamed.header.raw != planned.header.raw:
                raise IntegrityError(f"{path} changed while it was being pushed; push it again")
            return signer

        stored = catalog.stored(m.name, m.version)
        if stored is not None:
            check = ArtifactStream(str(path), st.st_size, same_header)
            digest, _ = copy_hashing(source, None, tap=check)
            check.finish()
            same_bytes(stored, digest)
            if store.exists(digest):
                return PushResult(stored, False)
            source.seek(0)  # its blob went missing: the push below puts it back
        stream = ArtifactStream(str(path), st.st_size, same_header)
        return _stream_in(source, path, stream, store, recorder, copying)


def _stream_in(
    source: BinaryIO,
    path: Path,
    stream: ArtifactStream,
    store: BlobStore,
    recorder: Callable[[], Recorder],
    copying: Callable[[], None] | None,
) -> PushResult:
    if copying is not None:
        copying()
    with store.stage(source, f"push {path.name}", stream) as staged:
        return recorder().push_streamed(staged, stream)
