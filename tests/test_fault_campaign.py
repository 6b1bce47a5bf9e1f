"""A short run of the fault-injection campaign (fuzz/faults.py): every random perturbation after
unload, over the four model families, gives a verdict other than PASS and never a crash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "fuzz" / "faults.py"


@pytest.fixture(scope="module")
def campaign():
    spec = importlib.util.spec_from_file_location("revreg_fault_campaign", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_perturbations_after_unload_are_all_detected(campaign, tmp_path: Path):
    setups = campaign.build_setups(tmp_path, list(campaign.FAMILIES))
    families = sorted(setups)
    rows = [campaign.trial(i, 11, families[i % len(families)], setups) for i in range(4 * len(campaign.PERTURBATIONS))]
    report = campaign.summarize(rows, 11, 0.0)
    assert report["misses"] == [] and report["overall"]["rate"] == 1.0
    assert len({r["kind"] for r in rows}) >= len(campaign.PERTURBATIONS) - 3  # most classes drawn


def test_a_trial_is_replayed_exactly_from_its_index(campaign, tmp_path: Path):
    setups = campaign.build_setups(tmp_path, ["toy"])
    first, again = (campaign.trial(7, 3, "toy", setups) for _ in range(2))
    assert first == again and first["verdict"] == "FAIL"


def test_trial_5241_of_the_long_run_flips_a_float_sign_and_fails(campaign, tmp_path: Path):
    """The long run's one crash: flipping the sign bit of LayerNorm.eps overflowed the
    campaign's own signed bit arithmetic before anything was planted. Replayed after the fix."""
    setups = campaign.build_setups(tmp_path, ["gpt2"])
    row = campaign.trial(5241, 2026, "gpt2", setups)
    assert row["what"] == "module transformer.h.1.ln_1: eps = -1e-05" and row["verdict"] == "FAIL"
    assert row["reason"].endswith("module transformer.h.1.ln_1: attribute eps 1e-05 -> -1e-05")
