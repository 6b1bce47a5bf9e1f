"""`revreg demo`: the whole story on a tiny model revreg builds itself, on an embedded registry."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click

from revreg.artifacts.artifact import load_artifact, pack, utc_timestamp
from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import from_tensors, write_probes
from revreg.artifacts.sources import identity_of_module, identity_of_path
from revreg.artifacts.spec import read_spec
from revreg.errors import RevregError


def _step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


def _keys(ring: Keyring, name: str) -> None:
    if not (ring.directory / f"{name}.key").exists():
        ring.generate(name)


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to put the demo's files (default: a new temporary directory). Emptied first.",
)
def demo(directory: Path | None) -> None:
    """Run the end-to-end demo on an embedded SQLite registry.

    Builds a tiny model itself (nothing is downloaded), then: identity, keys, a signed behavior,
    registry push, tamper refusal, probes, certification (PASS, RF = 1) beside the merge
    baseline, publish, pull, audit and fsck. Every file it made stays in --dir.
    """
    import torch
    from safetensors.torch import save_file

    from revreg.certification.certify import ProbeSource, certify
    from revreg.registry.service import Registry
    from revreg.verifier.protocol import summary_rows
    from revreg.verifier.toy import build

    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="revreg-demo-"))
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    _step("base model: a tiny LM built from a seed, saved as safetensors")
    model = build()
    save_file(model.state_dict(), root / "base.safetensors")
    identity = identity_of_path(root / "base.safetensors").identity
    assert identity_of_module(model).identity == identity
    click.echo(f"    identity {identity}\n    (the same from the file and from the live module)")

    _step("keys: a publisher key signs behaviors, a verifier key signs certifications")
    ring = Keyring(root / "keys")
    for name in ("demo-publisher", "demo-verifier"):
        _keys(ring, name)
        click.echo(f"    {name} {ring.signer(name).keyid}")

    _step("behavior: a rank-4 LoRA on `up` and a steering vector after `down`, packed and signed")
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
        signer=ring.signer("demo-publisher"),
        created=utc_timestamp(),
        provenance=imported.provenance,
        **extra,
    )
    verified = load_artifact(artifact, ring.trusted())
    click.echo(f"    {artifact.name} {verified.digest}\n    bound to base {verified.manifest.base}")

    _step("registry: an embedded SQLite registry; trust the keys, register the base, push")
    registry = Registry.init(str(root / "registry"), actor="demo")
    registry.trust_key(ring.public_pem("demo-publisher"), "demo-publisher", "publisher")
    registry.trust_key(ring.public_pem("demo-verifier"), "demo-verifier", "verifier")
    registry.register_base(root / "base.safetensors", "tiny-lm")
    pushed = registry.push(artifact).version
    click.echo(
        f"    pushed {pushed.ref} ({pushed.state}); pushing the same bytes again is a no-op: "
        f"{'ok' if not registry.push(artifact).created else 'FAILED'}"
    )

    _step("tamper check: one flipped byte in the tensors is refused before anything is stored")
    tampered = root / "tampered.safetensors"
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    try:
        registry.push(tampered)
        click.echo("    NOT refused (this is a bug)")
    except RevregError as exc:
        click.echo(f"    refused: {exc}")
    tampered.unlink()

    _step("probes: 16 token sequences, content-addressed and stored in the registry")
    save_file({"input_ids": torch.randint(0, 64, (16, 12), generator=g)}, root / "probe-inputs.safetensors")
    tensors, probe_manifest = from_tensors(root / "probe-inputs.safetensors", "demo-probes", batch_size=4)
    write_probes(root / "demo-probes.safetensors", tensors, probe_manifest)
    probe_info, _ = registry.push_probes(root / "demo-probes.safetensors")
    click.echo(f"    {probe_info.name} {probe_info.digest}")

    _step("certify: load base, attach, run, unload, fingerprint; 3 cycles; merge baseline alongside")
    done = certify(
        registry,
        pushed.ref,
        ProbeSource(digest=probe_info.digest),
        root / "base.safetensors",
        ring.signer("demo-verifier"),
        factory="revreg.verifier.toy:build",
        cycles=3,
        baselines=["merge"],
    )
    result = done.result
    for label, value in summary_rows(result):
        click.echo(f"    {label:<20} {value}")
    (root / "certification.dsse.json").write_bytes(done.envelope)
    state = done.recorded.state if done.recorded else "?"
    click.echo(
        f"    certification of {done.version.pinned} signed by demo-verifier and recorded: {pushed.ref} is {state}"
    )
    merge = result.baselines[0] if result.baselines else {}
    if merge.get("refused"):
        click.echo(f"    merge baseline refused: {merge['refused']}")
    elif merge:
        click.echo(
            f"    merge baseline: after W += dW, W -= dW the weights are bitwise restored: "
            f"{merge.get('weights_bitwise_after_subtract')} ({merge.get('weight_elements_changed')} elements differ, "
            f"max |dW| {merge.get('max_abs_weight_error') or 0:.2g}); "
            f"outputs off by up to {merge.get('max_abs_reset') or 0:.2g}"
        )

    _step("publish and pull: digest, signature and certification re-checked on the way out")
    registry.publish(pushed.ref)
    registry.tag(pushed.ref, "latest")
    pulled = registry.pull("demo-behavior", root / "pulled.safetensors")
    click.echo(
        f"    {pulled.ref} ({pulled.state}) -> pulled.safetensors (identical: "
        f"{(root / 'pulled.safetensors').read_bytes() == artifact.read_bytes()})"
    )

    _step("audit and fsck")
    verdict = registry.audit_verify()
    report = registry.fsck()
    click.echo(
        f"    audit chain: {'intact' if verdict.ok else verdict.problem} ({verdict.rows} rows); "
        f"fsck: {len(report.problems)} problems"
    )
    click.echo(f"\nfiles are in {root}; try: revreg ls --registry {root / 'registry'}")
