"""`revreg pack`, `revreg inspect` and `revreg export`: build, examine and convert artifacts."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import click

from revreg.artifacts.artifact import (
    Artifact,
    VerifiedArtifact,
    open_artifact,
    read_tensors,
    utc_timestamp,
    verify_artifact,
)
from revreg.artifacts.artifact import (
    pack as pack_artifact,
)
from revreg.artifacts.identity import Identity, looks_like_identity, parse_identity
from revreg.artifacts.peft_io import read_peft, write_peft
from revreg.artifacts.sources import identity_of_path
from revreg.artifacts.spec import read_spec
from revreg.cli.options import (
    human_bytes,
    json_option,
    keyring,
    keys_dir_option,
    passphrase_env_option,
    shown,
)
from revreg.cli.options import (
    signer as make_signer,
)
from revreg.errors import InputError, RevregError, UnknownKeyError


def _base_identity(base: str) -> Identity:
    if looks_like_identity(base):
        return parse_identity(base)
    from revreg.artifacts.hfcache import resolve_model

    try:
        path = resolve_model(base)
    except InputError as exc:
        raise InputError(
            f"--base {base!r} is neither an identity (sha256:<64 hex>) nor a model path or Hugging Face cache "
            f"entry ({exc})"
        ) from exc
    return identity_of_path(path).identity


def _created(value: str | None) -> str:
    if value:
        return value
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        from datetime import UTC, datetime

        try:
            return utc_timestamp(datetime.fromtimestamp(int(epoch), UTC))
        except ValueError as exc:
            raise InputError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds") from exc
    return utc_timestamp()


@click.command()
@click.option(
    "--peft",
    "peft_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).",
)
@click.option(
    "--tensors",
    "tensors_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A safetensors file of behavior tensors (with --spec).",
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON spec saying where each tensor attaches (lora, ia3, steer).",
)
@click.option(
    "--base",
    required=True,
    help="Base model: a path (file, shards, HF directory), org/name[@revision] from the local Hugging Face cache, "
    "or an identity string.",
)
@click.option("--name", required=True, help="Behavior name (lowercase, no path separators).")
@click.option("--version", "version", required=True, help="Behavior version, e.g. 1.0.0.")
@click.option("--key", "key_name", required=True, help="Signing key name in the keyring.")
@click.option(
    "--created",
    default=None,
    help="Creation time to record, in UTC like 2026-01-31T12:00:00Z; default $SOURCE_DATE_EPOCH, else now.",
)
@click.option(
    "--tensor-hash",
    type=click.Choice(["blake3", "sha256"]),
    default="blake3",
    show_default=True,
    help="Algorithm of the signed tensors digest (the identity scheme's). The file's own sha256, "
    "its address in a registry, is the same either way; sha256 costs push and pull a second sha256 pass.",
)
@click.option("--description", default=None, help="Free-text description (overrides the spec's).")
@click.option("--license", "license_", default=None, help="License identifier (overrides the spec's).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Artifact file to write (.safetensors).",
)
@keys_dir_option
@passphrase_env_option
@json_option
def pack(
    peft_dir: Path | None,
    tensors_path: Path | None,
    spec_path: Path | None,
    base: str,
    name: str,
    version: str,
    key_name: str,
    created: str | None,
    tensor_hash: str,
    description: str | None,
    license_: str | None,
    output: Path,
    keys_dir: Path | None,
    passphrase_env: str | None,
    as_json: bool,
) -> None:
    """Build one signed behavior artifact bound to a base model's identity.

    From a PEFT adapter directory (--peft) or from a tensors file plus a JSON spec
    (--tensors and --spec). Packing is byte-reproducible: the same inputs, key and
    --created give the same bytes.
    """
    if bool(peft_dir) == bool(tensors_path or spec_path) or (tensors_path is None) != (spec_path is None):
        raise InputError("give either --peft DIR or both --tensors FILE and --spec FILE")
    extra: dict[str, Any] = {}
    if peft_dir:
        imported = read_peft(peft_dir)
    else:
        assert tensors_path is not None and spec_path is not None
        imported, extra = read_spec(tensors_path, spec_path)
    signer = make_signer(keys_dir, key_name, passphrase_env)
    from revreg import progress

    with progress.task(f"pack {output.name}"), contextlib.closing(imported):
        manifest = pack_artifact(
            output,
            imported.tensors,
            imported.attachments,
            name=name,
            version=version,
            base=_base_identity(base),
            signer=signer,
            created=_created(created),
            description=description if description is not None else extra.get("description", ""),
            license=license_ if license_ is not None else extra.get("license", ""),
            provenance=imported.provenance,
            tensor_hash=tensor_hash,
        )
    if as_json:
        from revreg.artifacts.artifact import file_digest

        doc = {
            "output": str(output),
            "digest": file_digest(output),
            "signer": signer.keyid,
            "manifest": manifest.to_dict(),
        }
        click.echo(json.dumps(doc, indent=1))
        return
    click.echo(
        f"packed {manifest.name}:{manifest.version} ({len(manifest.attachments)} attachments) "
        f"-> {output}, signed by {signer.name}"
    )


def _verify_with_keyring(artifact: Artifact, keys_dir: Path | None) -> VerifiedArtifact:
    try:
        return verify_artifact(artifact, keyring(keys_dir).trusted())
    except UnknownKeyError as exc:
        raise UnknownKeyError(f"{exc}: import the signer's public key with `revreg keys import NAME FILE`") from exc


def _report(artifact: Artifact, signer: str | None, digest: str | None, error: str | None) -> dict[str, Any]:
    m = artifact.manifest
    return {
        "file": str(artifact.path),
        "digest": digest,
        "manifest": m.to_dict(),
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
            for t in artifact.header.tensors
        ],
        "signature": {
            "keyids": [s.keyid for s in artifact.envelope.signatures],
            "signer": signer,
            "verified": error is None,
            "error": error,
        },
    }


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@keys_dir_option
def inspect(file: Path, as_json: bool, keys_dir: Path | None) -> None:
    """Show an artifact's manifest, digests, signer and signature verdict.

    The signature is checked against the public keys in the keyring, and every tensor
    byte against the signed manifest. Exit 1 if either check fails (the report is still
    printed), 2 if FILE is not a well-formed artifact.
    """
    artifact = open_artifact(file)
    try:
        verified = _verify_with_keyring(artifact, keys_dir)
        signer, digest, error = f"{verified.signer.name} ({verified.signer.keyid})", verified.digest, None
    except RevregError as exc:
        signer, digest, failure = None, None, exc
        error = str(exc)
    report = _report(artifact, signer, digest, error)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        m = artifact.manifest
        total = sum(t.nbytes for t in artifact.header.tensors)
        rows = [
            ("file", str(file)),
            ("digest", digest or "-"),
            ("behavior", f"{m.name}:{m.version}"),
            ("base", m.base),
            ("tensors", f"{m.tensors_digest} ({len(artifact.header.tensors)} tensors, {human_bytes(total)})"),
            ("created", m.created),
            ("description", m.description or "-"),
            ("license", m.license or "-"),
            ("source", str(m.provenance.get("source", "-"))),
            ("signer", signer or ", ".join(s.keyid for s in artifact.envelope.signatures)),
            ("signature", "OK" if error is None else f"FAILED: {error}"),
        ]
        for label, value in rows:
            click.echo(f"{label:<12} {shown(value)}")
        click.echo("attachments")
        for a in m.attachments:
            detail = (
                f" layer={a.layer} rank={a.rank} alpha={a.alpha:g} scaling={a.scaling:.6g}" if a.kind == "lora" else ""
            )
            click.echo(f"  {a.kind:<6} {shown(a.target)}{detail}")
    if error is not None:
        raise failure


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True, help="Output format.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory to create (must not exist, or be empty).",
)
@keys_dir_option
def export(file: Path, fmt: str, output: Path, keys_dir: Path | None) -> None:
    """Write a verified artifact back out as a PEFT LoRA adapter directory."""
    verified = _verify_with_keyring(open_artifact(file), keys_dir)
    write_peft(verified.manifest, read_tensors(file), output)
    click.echo(f"exported {verified.manifest.name}:{verified.manifest.version} as {fmt} -> {output}")
