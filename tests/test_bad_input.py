"""Every bad input ends in one clear line and exit code 2, with nothing half-written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from revreg.artifacts.artifact import MANIFEST_KEY, SIGNATURE_KEY, load_artifact, read_tensors
from revreg.artifacts.keys import Keyring
from revreg.artifacts.safetensors_io import read_header, write_safetensors
from revreg.errors import RevregError
from tests.conftest import CREATED


def _one_line_error(result, fragment: str, code: int = 2) -> None:
    """One line on stderr; exit 2 for bad input, 1 where a check ran and failed."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("revreg: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


ZERO_BASE = "sha256:" + "0" * 64


def _pack(run, out: Path, *args: str | Path, name: str = "x", key: str = "alice", env: dict | None = None):
    return run("pack", "--base", ZERO_BASE, "--name", name, "--version", "1", "--key", key, "-o", out, *args, env=env)


def _raw(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -100])
def test_truncated_artifact_is_refused(run, artifact: Path, tmp_path: Path, cut: int):
    data = artifact.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut])
    _one_line_error(run("inspect", bad), "truncated")


def test_malformed_header_is_refused(run, tmp_path: Path):
    _one_line_error(run("inspect", _raw(tmp_path / "m.safetensors", b"{not json}      ", b"")), "not valid JSON")
    _one_line_error(run("inspect", _raw(tmp_path / "l.safetensors", b"[1,2,3]         ", b"")), "not a JSON object")


def test_header_too_large_is_refused(run, tmp_path: Path):
    bad = tmp_path / "big.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _one_line_error(run("inspect", bad), "too large")


def test_tensor_bytes_not_matching_dtype_and_shape_are_refused(run, tmp_path: Path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode()
    _one_line_error(run("inspect", _raw(tmp_path / "w.safetensors", header, b"\0" * 20)), "need 24")


def test_overlapping_offsets_are_refused(run, tmp_path: Path):
    header = json.dumps(
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
        }
    ).encode()
    _one_line_error(run("identity", _raw(tmp_path / "o.safetensors", header, b"\0" * 6)), "overlapping or gapped")


def test_plain_safetensors_is_not_an_artifact(run, tmp_path: Path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    _one_line_error(run("inspect", tmp_path / "plain.safetensors"), "not in revreg's canonical form")
    write_safetensors(tmp_path / "canon.safetensors", {"w": ("F32", (2,), bytes(8))}, {"x": "y"})
    _one_line_error(run("inspect", tmp_path / "canon.safetensors"), "not a revreg artifact")


def test_manifest_not_matching_tensors_is_refused(run, artifact: Path, tmp_path: Path):
    header = read_header(artifact)
    tensors = read_tensors(artifact)
    victim = sorted(tensors)[0]
    tensors[victim.replace("lora_A", "lora_X")] = tensors.pop(victim)
    bad = tmp_path / "swap.safetensors"
    write_safetensors(bad, tensors, header.metadata)
    _one_line_error(run("inspect", bad), "manifest does not match the tensors")


def test_signature_from_another_artifact_is_refused(run, artifact: Path, tmp_path: Path):
    header = read_header(artifact)
    other = tmp_path / "other.safetensors"
    shutil.copy(artifact, other)
    metadata = dict(header.metadata)
    envelope = json.loads(metadata[SIGNATURE_KEY])
    envelope["payload"] = envelope["payload"][:-8] + "AAAAAAA="
    metadata[SIGNATURE_KEY] = json.dumps(envelope, sort_keys=True, separators=(",", ":"))
    write_safetensors(other, read_tensors(artifact), metadata)
    _one_line_error(run("inspect", other), "covers a different manifest")


@pytest.mark.slow
def test_every_flipped_byte_is_refused(artifact: Path, keys_dir: Path, tmp_path: Path):
    trusted = Keyring(keys_dir).trusted()
    data = artifact.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    positions = sorted(
        set(range(0, 16)) | set(range(16, header_end, 7)) | set(range(header_end, len(data), 5)) | {len(data) - 1}
    )
    bad = tmp_path / "flip.safetensors"
    accepted = []
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        bad.write_bytes(flipped)
        try:
            load_artifact(bad, trusted)
        except RevregError:
            continue
        accepted.append(pos)
    assert accepted == []
    assert len(positions) > 1000


def test_flipped_tensor_byte_names_the_digest_mismatch(run, artifact: Path, tmp_path: Path):
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0x80
    (tmp_path / "f.safetensors").write_bytes(data)
    _one_line_error(run("inspect", tmp_path / "f.safetensors"), "tensor bytes do not match the signed manifest", code=1)


def test_flipped_manifest_byte_fails_the_signature(run, artifact: Path, tmp_path: Path):
    header = read_header(artifact)
    metadata = dict(header.metadata)
    metadata[MANIFEST_KEY] = metadata[MANIFEST_KEY].replace('"license":""', '"license":"X"')
    envelope = json.loads(metadata[SIGNATURE_KEY])
    import base64

    envelope["payload"] = base64.b64encode(metadata[MANIFEST_KEY].encode()).decode()
    metadata[SIGNATURE_KEY] = json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    write_safetensors(tmp_path / "m.safetensors", read_tensors(artifact), metadata)
    _one_line_error(
        run("inspect", tmp_path / "m.safetensors"), "does not verify: the signed content was modified", code=1
    )


def test_signature_by_unknown_key_is_refused(run, artifact: Path, tmp_path: Path):
    Keyring(tmp_path / "empty").generate("mallory")
    result = run("inspect", artifact, "--keys-dir", tmp_path / "empty")
    _one_line_error(result, "signed by unknown key sha256:", code=1)
    assert "signature    FAILED" in result.stdout


def test_wrong_passphrase_is_refused_and_nothing_written(run, peft_dir: Path, tmp_path: Path):
    assert run("keys", "generate", "sealed", "--passphrase-env", "P", env={"P": "right"}).exit_code == 0
    out = tmp_path / "out.safetensors"
    result = _pack(run, out, "--peft", peft_dir, "--passphrase-env", "P", key="sealed", env={"P": "wrong"})
    _one_line_error(result, "cannot decrypt key 'sealed': wrong passphrase")
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"peft_type": "IA3"}, "unsupported PEFT adapter type 'IA3'"),
        ({"use_dora": True}, "unsupported PEFT option use_dora"),
        ({"modules_to_save": ["lm_head"]}, "unsupported PEFT option modules_to_save"),
        ({"bias": "all"}, "unsupported PEFT option bias='all'"),
    ],
)
def test_unsupported_peft_config_is_refused(run, peft_dir: Path, tmp_path: Path, change: dict, fragment: str):
    bad = tmp_path / "adapter"
    shutil.copytree(peft_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | change))
    out = tmp_path / "out.safetensors"
    result = _pack(run, out, "--peft", bad)
    _one_line_error(result, fragment)
    assert not out.exists()


def test_failed_pack_leaves_an_existing_output_untouched(run, peft_dir: Path, artifact: Path, tmp_path: Path):
    before = artifact.read_bytes()
    result = _pack(run, artifact, "--peft", peft_dir, name="Bad/Name")
    _one_line_error(result, "invalid behavior name 'Bad/Name'")
    assert artifact.read_bytes() == before
    assert sorted(p.name for p in artifact.parent.iterdir() if p.name.startswith(".")) == []


def test_pack_needs_one_source(run, tmp_path: Path):
    result = _pack(run, tmp_path / "o.safetensors", "--created", CREATED)
    _one_line_error(result, "give either --peft DIR or both --tensors FILE and --spec FILE")


def test_bad_base_is_refused(run, peft_dir: Path, tmp_path: Path):
    result = run(
        "pack",
        "--peft",
        peft_dir,
        "--base",
        "sha256:xyz",
        "--name",
        "x",
        "--version",
        "1",
        "--key",
        "alice",
        "-o",
        tmp_path / "o.safetensors",
    )
    _one_line_error(result, "neither an identity")
