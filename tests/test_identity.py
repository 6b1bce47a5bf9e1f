"""Base identity: pinned test vectors, and the same identity from every source of weights."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from revreg.artifacts.identity import CHUNK_SIZE, hash_tensors
from revreg.artifacts.sources import identity_of_module, identity_of_path
from revreg.errors import FormatError, InputError
from tests.conftest import tiny_gpt2
from tests.vectors import load, sources, tensor_bytes


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def reference_identity(tensors: list[dict]) -> str:
    """docs/spec/identity.md written out sequentially with hashlib, as a second implementation."""
    leaves = []
    for t in tensors:
        data = tensor_bytes(t)
        chunks = [
            hashlib.sha256(b"revreg.identity.v1.chunk\x00" + data[i : i + CHUNK_SIZE]).digest()
            for i in range(0, len(data), CHUNK_SIZE)
        ]
        head = b"revreg.identity.v1.tensor\x00" + _s(t["name"]) + _s(t["dtype"]) + struct.pack("<I", len(t["shape"]))
        head += b"".join(struct.pack("<Q", d) for d in t["shape"]) + struct.pack("<Q", len(data))
        leaves.append((t["name"].encode(), hashlib.sha256(head + b"".join(chunks)).digest()))
    root = b"revreg.identity.v1.root\x00" + struct.pack("<Q", len(leaves))
    for name, leaf in sorted(leaves):
        root += struct.pack("<I", len(name)) + name + leaf
    return "sha256:" + hashlib.sha256(root).hexdigest()


@pytest.mark.parametrize("vector", load(), ids=lambda v: v["id"])
def test_identity_matches_pinned_vectors(vector):
    sha = hash_tensors(sources(vector), "sha256")
    assert sha.identity == vector["expected"]["sha256"]
    assert {t.name: t.digest for t in sha.tensors} == vector["expected"]["sha256_leaves"]
    assert hash_tensors(sources(vector), "blake3").identity == vector["expected"]["blake3"]
    assert reference_identity(vector["tensors"]) == vector["expected"]["sha256"]


def test_identity_of_safetensors_file_matches_vector(tmp_path: Path):
    vector = next(v for v in load() if v["id"] == "chunked")
    tensors = {t["name"]: torch.frombuffer(bytearray(tensor_bytes(t)), dtype=torch.uint8) for t in vector["tensors"]}
    tensors["small"] = tensors["small"].view(torch.float32).reshape(2, 3)
    save_file(tensors, tmp_path / "v.safetensors")
    assert identity_of_path(tmp_path / "v.safetensors").identity == vector["expected"]["sha256"]
    assert identity_of_path(tmp_path / "v.safetensors", "blake3").identity == vector["expected"]["blake3"]


def test_same_identity_from_module_file_shards_directory_and_streaming(gpt2_dir: Path, tmp_path: Path):
    model = tiny_gpt2()
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    expected = identity_of_module(model).identity
    assert identity_of_path(gpt2_dir).identity == expected
    assert identity_of_path(gpt2_dir / "model.safetensors").identity == expected
    assert identity_of_path(sharded).identity == expected
    assert identity_of_path(sharded / "model.safetensors.index.json").identity == expected
    # The chunked device-to-host copy used for GPU tensors, exercised without CUDA.
    assert identity_of_module(model, stream=True).identity == expected


def test_tied_weights_hash_once_under_the_name_checkpoints_keep(gpt2_dir: Path):
    model = tiny_gpt2()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    names = [t.name for t in identity_of_module(model).tensors]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert identity_of_module(model).identity == identity_of_path(gpt2_dir).identity


def test_untied_copy_is_a_different_model(gpt2_dir: Path):
    model = tiny_gpt2()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    manifest = identity_of_module(model)
    diff = identity_of_path(gpt2_dir).diff(manifest)
    assert diff.extra == ("lm_head.weight",) and not diff.changed and not diff.missing


def test_manifest_diff_names_exactly_the_changed_tensors(gpt2_dir: Path):
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] += 1e-7
    diff = identity_of_path(gpt2_dir).diff(identity_of_module(model))
    assert diff.changed == ("transformer.h.1.mlp.c_fc.bias",)
    assert not diff.missing and not diff.extra


def test_algorithms_give_different_named_identities(gpt2_dir: Path):
    sha = identity_of_path(gpt2_dir, "sha256").identity
    b3 = identity_of_path(gpt2_dir, "blake3").identity
    assert sha.startswith("sha256:") and b3.startswith("blake3:") and sha[7:] != b3[7:]


def test_module_identity_covers_bf16_and_non_contiguous_tensors():
    module = torch.nn.Linear(3, 5).to(torch.bfloat16)
    manifest = identity_of_module(module)
    assert {t.dtype for t in manifest.tensors} == {"BF16"}
    transposed = torch.nn.Module()
    transposed.register_buffer("w", torch.arange(6.0).reshape(2, 3).t())
    plain = torch.nn.Module()
    plain.register_buffer("w", torch.arange(6.0).reshape(2, 3).t().contiguous())
    assert identity_of_module(transposed).identity == identity_of_module(plain).identity


def test_shard_index_naming_a_missing_shard_is_refused(tmp_path: Path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    next((tmp_path / "m").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(InputError, match="is missing"):
        identity_of_path(tmp_path / "m")


def test_shard_index_that_disagrees_with_shards_is_refused(tmp_path: Path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"].pop(next(iter(doc["weight_map"])))
    index.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="do not match the shard index"):
        identity_of_path(tmp_path / "m")


def test_directory_without_safetensors_is_refused(tmp_path: Path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="no safetensors weights"):
        identity_of_path(tmp_path)


def test_identity_cli_prints_identity_and_compares(run, gpt2_dir: Path, tmp_path: Path):
    result = run("identity", gpt2_dir, "--manifest-out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    identity = identity_of_path(gpt2_dir).identity
    assert result.stdout.strip() == identity
    assert json.loads((tmp_path / "m.json").read_text())["identity"] == identity
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.wpe.weight[0, 0] = 5.0
    model.save_pretrained(tmp_path / "changed")
    result = run("identity", tmp_path / "changed", "--compare", tmp_path / "m.json")
    assert result.exit_code == 1
    assert "1 changed: transformer.wpe.weight" in result.stderr
    result = run("identity", gpt2_dir, "--compare", tmp_path / "m.json", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["compare"]["changed"] == []
