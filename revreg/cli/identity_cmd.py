"""`revreg identity`: the identity hash of a base model's weights."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import click

from revreg.artifacts.canonical import strict_loads
from revreg.artifacts.identity import ALGORITHMS, TensorManifest, hash_tensors
from revreg.artifacts.safetensors_io import atomic_output
from revreg.artifacts.sources import identity_of_path, open_checkpoint
from revreg.cli.options import MODEL, human_bytes, json_option
from revreg.errors import CheckFailed


def _manifest(path: Path, algorithm: str) -> TensorManifest:
    if path.is_file() and path.suffix == ".json" and not path.name.endswith(".index.json"):
        return TensorManifest.from_dict(strict_loads(path.read_bytes(), str(path)))
    if not sys.stderr.isatty():
        return identity_of_path(path, algorithm)
    with open_checkpoint(path) as sources:
        total = sum(s.nbytes for s in sources)
        lock = threading.Lock()
        with click.progressbar(length=total, label=f"hashing {path.name}", file=sys.stderr) as bar:

            def step(n: int) -> None:
                with lock:
                    bar.update(n)

            return hash_tensors(sources, algorithm, progress=step)


@click.command()
@click.argument("path", type=MODEL)
@click.option(
    "--algorithm",
    type=click.Choice(ALGORITHMS),
    default="sha256",
    show_default=True,
    help="Hash function; the identity string names it.",
)
@click.option(
    "--manifest-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the per-tensor manifest (JSON) here.",
)
@click.option(
    "--compare",
    type=MODEL,
    help="Another model (as PATH) or a saved manifest; list the tensors that differ (exit 1 if any).",
)
@json_option
def identity(path: Path, algorithm: str, manifest_out: Path | None, compare: Path | None, as_json: bool) -> None:
    """Print the identity hash of the model weights at PATH.

    PATH is a .safetensors file, a sharded checkpoint (*.safetensors.index.json), a
    Hugging Face model directory, or org/name[@revision] from the local Hugging Face cache
    (never downloaded). The same tensors give the same identity from any of them.
    """
    manifest = _manifest(path, algorithm)
    if manifest_out:
        with atomic_output(manifest_out) as fh:
            fh.write(json.dumps(manifest.to_dict(), indent=1).encode() + b"\n")
    diff = _manifest(compare, manifest.algorithm).diff(manifest) if compare else None
    if as_json:
        doc = manifest.to_dict()
        if diff is not None:
            doc["compare"] = {"missing": diff.missing, "extra": diff.extra, "changed": diff.changed}
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(manifest.identity)
        click.echo(f"  {len(manifest.tensors)} tensors, {human_bytes(manifest.total_bytes)}", err=True)
    if diff:
        raise CheckFailed(f"{path} differs from {compare}: {diff.describe()}")
    if diff is not None and not as_json:
        click.echo(f"  identical to {compare}", err=True)
