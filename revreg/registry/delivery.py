"""Delivering a version to the user's disk: stream into a staging file beside the destination,
check digest, signature and every tensor, then rename (or export as PEFT). Shared by the local
and the remote registry; imports no database code."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from revreg.artifacts.artifact import open_artifact, read_tensors, verify_artifact
from revreg.artifacts.keys import TrustedKey
from revreg.artifacts.peft_io import write_peft
from revreg.errors import InputError, IntegrityError, RevregError
from revreg.registry.api import VersionInfo

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
    fill: Callable[[BinaryIO], str],
    source: str,
) -> None:
    """Write a version to `dest` only after its bytes are checked: `fill` streams them into a
    staging file beside `dest` and returns their digest; then digest, signature and every
    tensor are checked and the file renamed (or exported as PEFT)."""
    check_format(fmt)
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "r+b", buffering=0) as sink:
            digest = fill(sink)
            os.fsync(sink.fileno())
        if digest != info.digest:
            raise IntegrityError(
                f"{source} for {info.ref} is corrupt: expected {info.digest}, read {digest}"
                + (" (run `revreg fsck`)" if source == "stored blob" else "")
            )
        with renamed_in_errors(tmp, f"{source} for {info.ref}"):
            verified = verify_artifact(open_artifact(tmp), publishers, digest=digest)
        signed = (verified.manifest.name, verified.manifest.version)
        if signed != (info.name, info.version):
            raise IntegrityError(
                f"{source} for {info.ref} is signed as {signed[0]}:{signed[1]}; the registry's record of it was "
                "altered (run `revreg fsck`)"
            )
        if fmt == "peft":
            write_peft(verified.manifest, read_tensors(tmp), dest)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
