"""Legitimate inputs get a PASS or a clean, serializable verdict: bases that change themselves
when they run, intermittent nondeterminism, non-finite outputs, models that no longer run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from revreg.verifier.protocol import VerificationResult, verify
from revreg.verifier.toy import build
from tests.verifier_helpers import Planted, gpt2_setup, make_behavior, make_probes, toy_setup


def _strict(result: VerificationResult) -> dict:
    doc = result.to_dict()
    return json.loads(json.dumps(doc, allow_nan=False))


def test_base_that_installs_hooks_on_its_first_run_passes(tmp_path: Path, keys_dir: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    config.output_hidden_states = True  # transformers installs output-capturing hooks on the first forward
    model, behavior, probes = gpt2_setup(tmp_path, keys_dir, GPT2LMHeadModel(config).eval())
    result = verify(model, behavior, probes)
    assert result.verdict == "PASS", result.reasons
    assert any("hooks _forward_hooks: 0 -> 1" in c for c in result.determinism["warmup_changes"])


def test_base_that_renormalizes_its_own_embedding_is_inconclusive(tmp_path: Path, keys_dir: Path):
    base = build()
    base.embed.max_norm = float(base.embed.weight.detach().norm(dim=1).median())  # half the rows exceed it
    model, behavior, probes = toy_setup(tmp_path, keys_dir, base)
    result = verify(model, behavior, probes)
    assert result.verdict == "INCONCLUSIVE"
    (reason,) = result.reasons
    assert reason.startswith("the base changed its own tensors when it ran, before any behavior was attached")
    assert "tensor embed.weight: bytes changed" in reason
    _strict(result)


def test_base_that_changes_state_on_every_run_is_inconclusive_not_blamed(tmp_path: Path, keys_dir: Path):
    base = build()
    base.embed.max_norm = float(base.embed.weight.detach().norm(dim=1).max()) * 2  # rows never exceed it...
    model, behavior, probes = toy_setup(tmp_path, keys_dir, base)
    result = verify(model, behavior, probes)
    # ...but embedding_renorm_ still writes the weight in place on every forward
    assert result.verdict == "INCONCLUSIVE", result.reasons
    (reason,) = result.reasons
    assert reason.startswith(
        "the base changes its own state whenever it runs, without the behavior: tensor embed.weight: version "
    )


class Counting(nn.Module):
    """A base that counts its forward passes in a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build()
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(input_ids)


def test_counting_base_is_inconclusive_naming_the_counter(tmp_path: Path, keys_dir: Path):
    base = Counting().eval()
    g = torch.Generator().manual_seed(1)
    behavior = make_behavior(
        tmp_path, keys_dir, base, [("inner.down", "steer", {"vector": torch.randn(32, generator=g)})]
    )
    probes = make_probes(tmp_path, {"input_ids": torch.randint(0, 64, (8, 10), generator=g)})
    result = verify(base, behavior, probes)
    assert result.verdict == "INCONCLUSIVE"
    assert result.reasons[0].startswith("the base changes its own state whenever it runs, without the behavior: ")
    assert "module <root>: attribute calls" in result.reasons[0]


def test_intermittent_nondeterminism_is_inconclusive_not_fail(tmp_path: Path, keys_dir: Path):
    model, behavior, probes = toy_setup(tmp_path, keys_dir)
    forwards = itertools.count(1)  # in a closure: no fingerprint can see it

    def every_fifth(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return output + 1e-3 if next(forwards) % 5 == 0 else output

    model.head.register_forward_hook(every_fifth)
    result = verify(model, behavior, probes)
    assert result.verdict == "INCONCLUSIVE", result.reasons
    assert result.reasons == [
        "the base alone is not repeatable: of 3 more runs after unload, 1 differ from its first runs"
    ]
    _strict(result)


def test_behavior_that_leaves_a_persistent_hidden_change_still_fails(tmp_path: Path, keys_dir: Path):
    """The re-check only excuses what the bare base does by itself: a change hidden in a
    closure that shows on every later run is the behavior's."""
    model, behavior, probes = toy_setup(tmp_path, keys_dir)
    shift = {"on": False}
    model.head.register_forward_hook(lambda m, a, out: out + 1e-3 if shift["on"] else out)
    result = verify(model, behavior, probes, engine=Planted(on_unload=lambda m: shift.update(on=True)))
    assert result.verdict == "FAIL"
    assert "cycle 0: probe outputs after unload differ from the base (max |delta| 0.001)" in result.reasons


def test_impossible_tokens_with_minus_inf_logits_pass_with_finite_metrics(tmp_path: Path, keys_dir: Path):
    base = build()
    with torch.no_grad():
        base.head.bias[:8] = -torch.inf  # tokens the model can never produce
    model, behavior, probes = toy_setup(tmp_path, keys_dir, base)
    result = verify(model, behavior, probes)
    assert result.verdict == "PASS", result.reasons
    doc = _strict(result)
    assert "non_finite" not in doc and 0 < doc["metrics"]["kl_adapted"] < float("inf")
    assert doc["metrics"]["rf"] == 1.0


def test_infinite_divergence_is_reported_as_such(tmp_path: Path, keys_dir: Path):
    model = build()
    vector = torch.zeros(64)
    vector[3] = -torch.inf  # the behavior makes a possible token impossible: KL(f0 || f) = inf
    behavior = make_behavior(tmp_path, keys_dir, model, [("head", "steer", {"vector": vector})])
    probes = make_probes(
        tmp_path, {"input_ids": torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(1))}
    )
    result = verify(model, behavior, probes)
    assert result.verdict == "PASS", result.reasons
    doc = _strict(result)
    assert doc["metrics"]["kl_adapted"] is None and doc["non_finite"]["metrics.kl_adapted"] == "inf"
    assert doc["metrics"]["max_abs_adapted"] is None and doc["metrics"]["js_adapted"] > 0
    assert doc["metrics"]["rf"] == 1.0


def test_a_model_broken_by_unload_fails_with_a_serializable_result(tmp_path: Path, keys_dir: Path):
    model, behavior, probes = toy_setup(tmp_path, keys_dir)

    def break_it(m: nn.Module) -> None:
        m.head.register_forward_pre_hook(lambda mod, args: (args[0][..., :3],))

    result = verify(model, behavior, probes, engine=Planted(on_unload=break_it))
    assert result.verdict == "FAIL"
    assert any("the model no longer runs the probes (RuntimeError" in r for r in result.reasons), result.reasons
    doc = _strict(result)
    assert doc["metrics"]["kl_reset"] is None and doc["non_finite"]["metrics.kl_reset"] == "inf"


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_base_outputs_are_compared_by_bytes(bad: str, tmp_path: Path, keys_dir: Path):
    base = build()
    with torch.no_grad():
        base.head.bias[5] = float(bad)
    model, behavior, probes = toy_setup(tmp_path, keys_dir, base)
    result = verify(model, behavior, probes)
    # A NaN or +inf logit makes every probability of its row NaN. Rollback is still proven on
    # bytes; the divergences are not numbers, so they are reported as such and RF is undefined.
    assert result.verdict == "PASS", result.reasons
    doc = _strict(result)
    assert doc["metrics"]["rf"] is None and doc["non_finite"]["metrics.kl_adapted"] == "nan"
    assert doc["metrics"]["kl_reset"] == 0.0
