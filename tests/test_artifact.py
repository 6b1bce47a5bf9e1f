"""Behavior artifacts: packing (PEFT and native specs), reproducibility, inspect, PEFT export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from revreg.artifacts.artifact import load_artifact, open_artifact
from revreg.artifacts.keys import Keyring
from revreg.artifacts.sources import identity_of_path
from tests.conftest import CREATED


def _pack(run, out: Path, *extra: str | Path, env: dict[str, str] | None = None):
    return run("pack", "--name", "demo", "--version", "1.0.0", "--key", "alice", "-o", out, *extra, env=env)


def test_packed_peft_artifact_verifies_and_binds_the_base(artifact: Path, keys_dir: Path, gpt2_dir: Path):
    verified = load_artifact(artifact, Keyring(keys_dir).trusted())
    m = verified.manifest
    assert m.base == identity_of_path(gpt2_dir).identity
    assert verified.signer.name == "alice"
    by_target = {a.target: a for a in m.attachments}
    assert by_target["transformer.wte"].layer == "embedding"
    assert by_target["transformer.h.0.attn.c_attn"].layer == "linear"
    # rank_pattern and alpha_pattern are honoured per module.
    assert (by_target["transformer.h.1.attn.c_attn"].rank, by_target["transformer.h.1.attn.c_attn"].alpha) == (2, 3.0)
    assert by_target["transformer.h.1.attn.c_attn"].scaling == 1.5
    assert by_target["transformer.h.0.attn.c_attn"].scaling == 2.0


def test_packing_is_byte_reproducible(run, peft_dir: Path, gpt2_dir: Path, tmp_path: Path):
    base = identity_of_path(gpt2_dir).identity
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"]
    for out, created in zip(outs, [CREATED, CREATED, "2026-01-02T00:00:00Z"], strict=True):
        assert _pack(run, out, "--peft", peft_dir, "--base", base, "--created", created).exit_code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() != outs[2].read_bytes()


def test_source_date_epoch_pins_the_timestamp(run, peft_dir: Path, gpt2_dir: Path, tmp_path: Path):
    out = tmp_path / "a.safetensors"
    assert _pack(run, out, "--peft", peft_dir, "--base", gpt2_dir, env={"SOURCE_DATE_EPOCH": "0"}).exit_code == 0
    assert open_artifact(out).manifest.created == "1970-01-01T00:00:00Z"


def test_native_spec_packs_lora_ia3_and_steer(run, tmp_path: Path, keys_dir: Path):
    torch.manual_seed(0)
    save_file(
        {"a": torch.randn(2, 8), "b": torch.randn(4, 2), "s": torch.rand(4) + 0.5, "v": torch.randn(8)},
        tmp_path / "t.safetensors",
    )
    spec = {
        "attachments": [
            {"target": "fc1", "kind": "lora", "alpha": 4, "rslora": True, "tensors": {"A": "a", "B": "b"}},
            {"target": "fc1", "kind": "ia3", "tensors": {"scale": "s"}},
            {"target": "fc2", "kind": "steer", "tensors": {"vector": "v"}},
        ],
        "description": "a test behavior",
        "license": "Apache-2.0",
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "native.safetensors"
    result = _pack(
        run,
        out,
        "--tensors",
        tmp_path / "t.safetensors",
        "--spec",
        tmp_path / "spec.json",
        "--base",
        "sha256:" + "ab" * 32,
    )
    assert result.exit_code == 0, result.output
    m = load_artifact(out, Keyring(keys_dir).trusted()).manifest
    kinds = {(a.target, a.kind): a for a in m.attachments}
    assert set(kinds) == {("fc1", "lora"), ("fc1", "ia3"), ("fc2", "steer")}
    assert kinds[("fc1", "lora")].scaling == pytest.approx(4 / 2**0.5)
    assert m.description == "a test behavior" and m.license == "Apache-2.0"
    assert sorted(load_file(out)) == ["fc1.ia3_scale", "fc1.lora_A", "fc1.lora_B", "fc2.steer_vector"]
    assert torch.equal(load_file(out)["fc2.steer_vector"], load_file(tmp_path / "t.safetensors")["v"])


def test_inspect_shows_manifest_signer_and_verdict(run, artifact: Path):
    result = run("inspect", artifact)
    assert result.exit_code == 0, result.output
    assert "signature    OK" in result.stdout and "alice (sha256:" in result.stdout
    assert "lora   transformer.wte layer=embedding rank=4 alpha=8 scaling=2" in result.stdout
    doc = json.loads(run("inspect", artifact, "--json").stdout)
    assert doc["signature"]["verified"] is True
    assert doc["manifest"]["name"] == "demo" and doc["digest"].startswith("sha256:")


def _peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 42, 7, 3]])).logits


def test_peft_export_round_trip_gives_identical_adapter(
    run, artifact: Path, peft_dir: Path, gpt2_dir: Path, tmp_path: Path
):
    out = tmp_path / "exported"
    result = run("export", artifact, "--format", "peft", "-o", out)
    assert result.exit_code == 0, result.output
    original, exported = load_file(peft_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert torch.equal(_peft_logits(gpt2_dir, peft_dir), _peft_logits(gpt2_dir, out))
    # And back again: packing the export gives the very same artifact bytes.
    again = tmp_path / "again.safetensors"
    assert _pack(run, again, "--peft", out, "--base", gpt2_dir, "--created", CREATED).exit_code == 0
    assert again.read_bytes() == artifact.read_bytes()


def test_native_lora_exports_to_a_peft_adapter_peft_can_load(run, gpt2_dir: Path, tmp_path: Path):
    torch.manual_seed(3)
    save_file({"a": torch.randn(2, 32), "b": torch.randn(96, 2)}, tmp_path / "t.safetensors")
    spec = {
        "attachments": [
            {"target": "transformer.h.0.attn.c_attn", "kind": "lora", "alpha": 2, "tensors": {"A": "a", "B": "b"}}
        ]
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    art = tmp_path / "n.safetensors"
    assert (
        _pack(
            run, art, "--tensors", tmp_path / "t.safetensors", "--spec", tmp_path / "spec.json", "--base", gpt2_dir
        ).exit_code
        == 0
    )
    assert run("export", art, "-o", tmp_path / "out").exit_code == 0
    # The adapter changes the output, so PEFT really loaded and applied it.
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        plain = base(torch.tensor([[1, 2, 3]])).logits
    assert not torch.equal(plain, _peft_logits(gpt2_dir, tmp_path / "out")[:, :3])


def test_export_refuses_kinds_peft_cannot_express(run, tmp_path: Path):
    save_file({"v": torch.ones(4)}, tmp_path / "t.safetensors")
    (tmp_path / "spec.json").write_text(
        json.dumps({"attachments": [{"target": "h.0", "kind": "steer", "tensors": {"vector": "v"}}]})
    )
    art = tmp_path / "s.safetensors"
    assert (
        _pack(
            run,
            art,
            "--tensors",
            tmp_path / "t.safetensors",
            "--spec",
            tmp_path / "spec.json",
            "--base",
            "sha256:" + "00" * 32,
        ).exit_code
        == 0
    )
    result = run("export", art, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "no equivalent of revreg kind 'steer'" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provenance", "abc"),
        ("provenance", ["x"]),
        ("provenance", [["peft_config", {"r": 1}]]),
        ("description", 1),
        ("license", None),
        ("created", ["2026"]),
        ("name", 5),
        ("name", None),
        ("version", 1),
        ("version", ["1.0.0"]),
    ],
)
def test_a_manifest_field_of_the_wrong_json_type_is_refused(
    keys_dir: Path, tmp_path: Path, field: str, value: object
) -> None:
    """Signed or not, a manifest whose provenance is not an object (or whose free text is not a
    string) is a format error, not something later commands trip over."""
    from revreg.artifacts.artifact import BehaviorManifest, open_artifact
    from revreg.artifacts.canonical import canonical_json
    from revreg.errors import FormatError
    from tests.conftest import make_artifact

    doc = open_artifact(make_artifact(tmp_path / "a.safetensors", keys_dir)).manifest.to_dict()
    doc[field] = value
    with pytest.raises(FormatError, match=f"manifest {field} is not a JSON"):
        BehaviorManifest.from_bytes(canonical_json(doc))


@pytest.mark.parametrize(("field", "value"), [("name", "../../etc"), ("name", "Demo"), ("version", "x/../y")])
def test_a_signed_name_or_version_that_pack_refuses_is_refused_on_read(
    keys_dir: Path, tmp_path: Path, field: str, value: str
) -> None:
    """A manifest is checked on read as pack checks it: a name that is a path never reaches a
    registry, signed or not."""
    from revreg.artifacts.artifact import BehaviorManifest, open_artifact
    from revreg.artifacts.canonical import canonical_json
    from revreg.errors import FormatError
    from tests.conftest import make_artifact

    doc = open_artifact(make_artifact(tmp_path / "a.safetensors", keys_dir)).manifest.to_dict()
    doc[field] = value
    with pytest.raises(FormatError, match=f"invalid {'behavior name' if field == 'name' else 'version'}"):
        BehaviorManifest.from_bytes(canonical_json(doc))


def _signed_with_digest(out: Path, keys_dir: Path, digest: str) -> Path:
    """The conftest artifact's tensors under a manifest signed by a trusted key that claims
    `digest` for them (what only a key holder could make)."""
    import dataclasses

    from revreg.artifacts.artifact import MANIFEST_KEY, PAYLOAD_TYPE, SIGNATURE_KEY, open_artifact
    from revreg.artifacts.dsse import sign
    from revreg.artifacts.identity import parse_identity
    from revreg.artifacts.safetensors_io import write_safetensors
    from tests.conftest import make_artifact

    source = open_artifact(make_artifact(out.with_suffix(".src"), keys_dir))
    tensors = load_file(str(source.path))
    manifest = dataclasses.replace(source.manifest, tensors_digest=parse_identity(digest))
    payload = manifest.to_bytes()
    envelope = sign(payload, PAYLOAD_TYPE, Keyring(keys_dir).signer("alice"))
    raw = {n: ("F32", tuple(t.shape), t.numpy().tobytes()) for n, t in tensors.items()}
    write_safetensors(out, raw, {MANIFEST_KEY: payload.decode(), SIGNATURE_KEY: envelope.to_json().decode()})
    return out


@pytest.mark.parametrize("tensor_hash", ["blake3", "sha256"])
def test_the_tensors_digest_names_its_algorithm_and_every_check_uses_that_one(
    keys_dir: Path, tmp_path: Path, tensor_hash: str
) -> None:
    """pack signs the algorithm with the digest; the file check, the streamed check (push and
    pull) and the loaded-tensor check hash with the algorithm named, so the same hex under the
    other algorithm's name, signed by a trusted key, is refused everywhere."""
    from revreg.artifacts.stream import ArtifactStream
    from revreg.errors import IntegrityError
    from revreg.registry.store import copy_hashing
    from revreg.verifier.engine import load_behavior
    from tests.conftest import make_artifact

    trusted = Keyring(keys_dir).trusted()
    good = make_artifact(tmp_path / "good.safetensors", keys_dir, tensor_hash=tensor_hash)
    digest = load_artifact(good, trusted).manifest.tensors_digest
    assert digest.startswith(tensor_hash + ":")
    assert load_behavior(good, trusted).manifest.tensors_digest == digest

    real = open_artifact(make_artifact(tmp_path / "real.safetensors", keys_dir)).manifest.tensors_digest
    other = "sha256" if real.startswith("blake3:") else "blake3"
    forged = _signed_with_digest(tmp_path / "forged.safetensors", keys_dir, f"{other}:{real.split(':', 1)[1]}")
    with pytest.raises(IntegrityError, match="do not match the signed manifest"):
        load_artifact(forged, trusted)
    stream = ArtifactStream("forged", forged.stat().st_size)
    with open(forged, "rb") as fh:
        copy_hashing(fh, None, tap=stream)
    with pytest.raises(IntegrityError, match="do not match the signed manifest"):
        stream.finish()


def test_a_tensors_digest_in_an_unknown_algorithm_is_refused(keys_dir: Path, tmp_path: Path) -> None:
    from revreg.artifacts.artifact import BehaviorManifest
    from revreg.artifacts.canonical import canonical_json
    from revreg.errors import FormatError
    from tests.conftest import make_artifact

    doc = open_artifact(make_artifact(tmp_path / "a.safetensors", keys_dir)).manifest.to_dict()
    doc["tensors"]["digest"] = "md5:" + "00" * 16
    with pytest.raises(FormatError):
        BehaviorManifest.from_bytes(canonical_json(doc))


def test_pack_refuses_an_unknown_tensor_hash(run, tmp_path: Path, keys_dir: Path) -> None:
    tensors = tmp_path / "t.safetensors"
    save_file({"h.0.steer_vector": torch.zeros(4)}, str(tensors))
    spec = tmp_path / "spec.json"
    attachment = {"target": "h.0", "kind": "steer", "tensors": {"vector": "h.0.steer_vector"}}
    spec.write_text(json.dumps({"attachments": [attachment]}))
    out = tmp_path / "o.safetensors"
    result = run(
        "pack", "--tensors", tensors, "--spec", spec, "--base", "sha256:" + "ab" * 32, "--name", "d",
        "--version", "1", "--key", "alice", "--keys-dir", keys_dir, "--tensor-hash", "md5", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 2 and "--tensor-hash" in result.stderr and not out.exists()
