"""Delivering a version to the user's disk: stream into a staging file beside the destination
checking signature, digest and every tensor on the way, then rename (or export as PEFT). Shared by the local
and the remote registry; imports no database code."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from revreg.artifacts.artifact import Artifact, read_tensors, verify_signature
from revreg.artifacts.keys import TrustedKey
from revreg.artifacts.stream import ArtifactStream
from revreg.errors import FormatError, InputError, IntegrityError, RevregError
from revreg.registry.api import VersionInfo
from revreg.registry.store import Tap

FORMATS = ("safetensors", "peft")


@contextmanager
def renamed_in_errors(staging: Path, label: str) -> Iterator[None]:
    """Errors about a staging copy name what the user knows instead (their file, or the ref)."""
    try:
        yield
    except RevregError as exc:
        exc.args = (str(exc).replace(str(staging), label),)
        raise


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use safetensors or peft")


def deliver(
    info: VersionInfo,
    publishers: Mapping[str, TrustedKey],
    dest: Path,
    fmt: str,
    fill: Callable[[BinaryIO, Tap], str],
    source: str,
    confirm: Callable[[], None] | None = None,
) -> None:
    """Write a version to `dest` only after its bytes are checked, reading them once: `fill`
    streams them into a staging file beside `dest` through `tap` (revreg.artifacts.stream: the
    header parsed and its signature and name checked before any tensor byte, then every tensor
    hashed from the copy's own buffers) and returns their sha256; then digest and tensors are
    compared, `confirm()` runs (it may still refuse: registry.embedded checks the version's
    state and certification meanwhile), and the file is renamed (or exported as PEFT)."""
    check_format(fmt)
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InputError(f"cannot write {dest}: {parent} {what}; nothing was written")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent)
    tmp = Path(tmp_name)
    label = f"{source} for {info.ref}"

    refused: list[RevregError] = []

    def check_header(artifact: Artifact) -> TrustedKey | None:
        # A refusal is reported after the digest is known: a blob that is not the recorded one
        # is named corrupt, whichever of its bytes the damage hit (a signature's, say).
        try:
            signer = verify_signature(artifact, publishers)
            signed = (artifact.manifest.name, artifact.manifest.version)
            if signed != (info.name, info.version):
                raise IntegrityError(
                    f"{label} is signed as {signed[0]}:{signed[1]}; "
                    "the registry's record of it was altered (run `revreg fsck`)"
                )
        except RevregError as exc:
            refused.append(exc)
            return None
        return signer

    stream = ArtifactStream(label, info.size, check_header)
    hint = " (run `revreg fsck`)" if source == "stored blob" else ""
    try:
        try:
            with os.fdopen(fd, "r+b", buffering=0) as sink, renamed_in_errors(tmp, label):
                digest = fill(sink, stream)
            if digest != info.digest:
                raise IntegrityError(f"{label} is corrupt: expected {info.digest}, read {digest}{hint}")
            if refused:
                raise refused[0]
            with renamed_in_errors(tmp, label):
                artifact = stream.finish()
        except FormatError as exc:
            # The registry's own bytes (or its server's answer) that do not parse are damage, not
            # the user's bad input: a failed check (exit 1), like any other digest mismatch.
            detail = str(exc).removeprefix(f"{label}: ")
            raise IntegrityError(f"{label} is corrupt: {detail}{hint}") from exc
        if confirm is not None:
            confirm()
        if fmt == "peft":
            from revreg.artifacts.peft_io import write_peft  # only here: 19 ms of imports a plain pull skips

            write_peft(artifact.manifest, read_tensors(tmp), dest)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
