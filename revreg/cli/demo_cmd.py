"""`revreg demo`: the whole story on a tiny model revreg builds itself."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from revreg.artifacts.artifact import load_artifact, pack, read_tensors, utc_timestamp
from revreg.artifacts.keys import Keyring
from revreg.artifacts.peft_io import write_peft
from revreg.artifacts.sources import identity_of_module, identity_of_path
from revreg.artifacts.spec import read_spec
from revreg.errors import RevregError


def _step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to put the demo's files (default: a new temporary directory).",
)
def demo(directory: Path | None) -> None:
    """Run the end-to-end demo: base identity, keys, a signed behavior, inspect, PEFT export.

    Builds a tiny model itself (nothing is downloaded) and leaves every file it made in --dir.
    """
    import torch
    from safetensors.torch import save_file

    from revreg.verifier.toy import build

    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="revreg-demo-"))
    root.mkdir(parents=True, exist_ok=True)

    _step("base model: a tiny LM built from a seed, saved as safetensors")
    model = build()
    save_file(model.state_dict(), root / "base.safetensors")
    identity = identity_of_path(root / "base.safetensors").identity
    assert identity_of_module(model).identity == identity
    click.echo(f"    identity {identity} (same from the file and from the live module)")

    _step("signing key")
    ring = Keyring(root / "keys")
    signer = ring.signer("demo-publisher") if (root / "keys" / "demo-publisher.key").exists() else None
    if signer is None:
        ring.generate("demo-publisher")
        signer = ring.signer("demo-publisher")
    click.echo(f"    {signer.name} {signer.keyid}")

    _step("behavior: a rank-4 LoRA on `up` and a steering vector after `down`")
    g = torch.Generator().manual_seed(1)
    save_file(
        {
            "a": torch.randn(4, 32, generator=g) * 0.3,
            "b": torch.randn(64, 4, generator=g) * 0.3,
            "v": torch.randn(32, generator=g) * 0.1,
        },
        root / "behavior-tensors.safetensors",
    )
    spec = {
        "attachments": [
            {"target": "up", "kind": "lora", "alpha": 8, "tensors": {"A": "a", "B": "b"}},
            {"target": "down", "kind": "steer", "tensors": {"vector": "v"}},
        ],
        "description": "demo behavior",
        "license": "Apache-2.0",
    }
    (root / "behavior-spec.json").write_text(json.dumps(spec, indent=1))
    imported, extra = read_spec(root / "behavior-tensors.safetensors", root / "behavior-spec.json")
    artifact = root / "demo-behavior-1.0.0.safetensors"
    pack(
        artifact,
        imported.tensors,
        imported.attachments,
        name="demo-behavior",
        version="1.0.0",
        base=identity,
        signer=signer,
        created=utc_timestamp(),
        provenance=imported.provenance,
        **extra,
    )
    verified = load_artifact(artifact, ring.trusted())
    click.echo(
        f"    {artifact.name}: {verified.digest}, signed by {verified.signer.name}, "
        f"{len(verified.manifest.attachments)} attachments, bound to {verified.manifest.base[:19]}..."
    )

    _step("a PEFT LoRA behavior, exported to a PEFT adapter directory")
    lora_only = root / "demo-lora-1.0.0.safetensors"
    tensors = {k: v for k, v in imported.tensors.items() if k.startswith("up.")}
    pack(
        lora_only,
        tensors,
        tuple(a for a in imported.attachments if a.kind == "lora"),
        name="demo-lora",
        version="1.0.0",
        base=identity,
        signer=signer,
        created=utc_timestamp(),
    )
    peft_dir = root / "demo-lora-peft"
    if not peft_dir.exists():
        write_peft(load_artifact(lora_only, ring.trusted()).manifest, read_tensors(lora_only), peft_dir)
    click.echo(f"    {peft_dir}: {', '.join(sorted(p.name for p in peft_dir.iterdir()))}")

    _step("tamper check: one flipped byte in the behavior's tensors is refused")
    tampered = root / "tampered.safetensors"
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    try:
        load_artifact(tampered, ring.trusted())
    except RevregError as exc:
        click.echo(f"    refused: {exc}")
    tampered.unlink()
    click.echo(f"\nfiles are in {root}")
