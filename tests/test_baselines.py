"""Mutation baselines: every kind merges into the layer it attaches to, computing the same
function as the hook path up to rounding, or is refused with a reason; tied weights are merged
once; noise is reset without a snapshot; the model always comes back as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from revreg.errors import InputError
from revreg.verifier.protocol import verify
from revreg.verifier.toy import build
from tests.conftest import tiny_gpt2
from tests.verifier_helpers import gpt2_setup, make_behavior, make_probes


def _baseline(result, spec: str = "merge") -> dict:
    return next(b for b in result.to_dict()["baselines"] if b["baseline"] == spec)


def _probes(tmp: Path, vocab: int = 64, output: str = "output"):
    ids = torch.randint(0, vocab, (8, 10), generator=torch.Generator().manual_seed(9))
    return make_probes(tmp, {"input_ids": ids}, output=output, name=f"b{vocab}")


def test_every_toy_kind_merges_into_its_layer_and_matches_the_hook_path(tmp_path: Path, keys_dir: Path):
    model = build()
    g = torch.Generator().manual_seed(1)
    behavior = make_behavior(
        tmp_path,
        keys_dir,
        model,
        [
            ("up", "lora", {"A": torch.randn(4, 32, generator=g) * 0.3, "B": torch.randn(64, 4, generator=g) * 0.3}),
            ("up", "ia3", {"scale": torch.rand(64, generator=g) + 0.5}),  # after the LoRA, on the same layer
            ("embed", "ia3", {"scale": torch.rand(32, generator=g) + 0.5}),
            ("norm", "ia3", {"scale": torch.rand(32, generator=g) + 0.5}),
            ("norm", "steer", {"vector": torch.randn(32, generator=g) * 0.1}),
            ("down", "steer", {"vector": torch.randn(32, generator=g) * 0.1}),
            ("embed", "steer", {"vector": torch.randn(32, generator=g) * 0.1}),
        ],
    )
    result = verify(model, behavior, _probes(tmp_path), cycles=1, baselines=["merge"])
    assert result.verdict == "PASS", result.reasons
    merge = _baseline(result)
    # the merged model computes the behavior's function: same divergence up to float rounding
    assert merge["kl_adapted"] == pytest.approx(result.adapted.mean, rel=1e-4)
    assert merge["restored_from_snapshot"] and merge["left_after_restore"] == []
    assert merge["reset"] == "un-merged by subtraction and division (PEFT's unmerge)"


def test_lora_on_a_tied_lm_head_is_merged_once_and_leaves_the_embedding_alone(tmp_path: Path, keys_dir: Path):
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(4)
    behavior = make_behavior(
        tmp_path,
        keys_dir,
        model,
        [("lm_head", "lora", {"A": torch.randn(4, 32, generator=g) * 0.3, "B": torch.randn(97, 4, generator=g) * 0.3})],
    )
    wte = model.transformer.wte.weight
    result = verify(model, behavior, _probes(tmp_path, 97, "logits"), cycles=1, baselines=["merge"])
    assert result.verdict == "PASS", result.reasons
    merge = _baseline(result)
    assert merge["tied_merged_once"] == ["lm_head.weight (tied with transformer.wte.weight)"]
    assert merge["kl_adapted"] == pytest.approx(result.adapted.mean, rel=1e-4)  # was 3.15 against 0.175
    assert model.lm_head.weight is wte and merge["restored_from_snapshot"]


def test_kinds_that_cannot_be_merged_are_refused_with_a_reason(tmp_path: Path, keys_dir: Path):
    model, behavior, probes = gpt2_setup(tmp_path, keys_dir)  # ia3 on a GPT2MLP block
    result = verify(model, behavior, probes, cycles=1, baselines=["merge", "noise:0.01"])
    assert result.verdict == "PASS"
    merge = _baseline(result)
    assert merge == {
        "baseline": "merge",
        "refused": "ia3 on transformer.h.1.mlp: ia3 merges into Linear, Conv1D, Embedding or an affine LayerNorm, "
        "not a GPT2MLP (its output is not one layer's weights)",
    }
    noise = _baseline(result, "noise:0.01")
    assert noise["refused"] == "noise on transformer.h.1.mlp: GPT2MLP has no weight to fold into"


def test_steer_without_a_bias_is_refused(tmp_path: Path, keys_dir: Path):
    model = build()
    model.head.bias = None
    behavior = make_behavior(tmp_path, keys_dir, model, [("head", "steer", {"vector": torch.randn(64)})])
    result = verify(model, behavior, _probes(tmp_path), cycles=1, baselines=["merge"])
    assert _baseline(result)["refused"] == "steer on head: Linear has no bias to fold into"


def test_noise_reset_without_a_snapshot_leaves_the_outputs_mutated(tmp_path: Path, keys_dir: Path):
    model = build()
    behavior = make_behavior(tmp_path, keys_dir, model, [("up", "ia3", {"scale": torch.rand(64) + 0.5})])
    result = verify(model, behavior, _probes(tmp_path), cycles=1, baselines=["noise:0.05"])
    noise = _baseline(result, "noise:0.05")
    assert (
        noise["rf"] == 0.0 and noise["kl_reset"] == noise["kl_adapted"] > 0 and not noise["outputs_bitwise_after_reset"]
    )
    assert noise["reset"].startswith("none: without a snapshot the noise is not known")
    assert noise["weight_elements_changed"] > 0 and not noise["identity_after_reset_is_base"]
    assert noise["restored_from_snapshot"]


@pytest.mark.parametrize("spec", ["noise", "noise:x", "noise:nan", "noise:-1", "merge2"])
def test_malformed_baselines_are_refused_before_anything_runs(spec: str, tmp_path: Path, keys_dir: Path):
    model = build()
    behavior = make_behavior(tmp_path, keys_dir, model, [("up", "ia3", {"scale": torch.rand(64) + 0.5})])
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(InputError, match="baseline"):
        verify(model, behavior, _probes(tmp_path), baselines=[spec])
    assert calls == []
