"""Divergence metrics and RF on values whose answers are known."""

from __future__ import annotations

import math

import torch

from revreg.verifier.metrics import compare, recoverability


def test_identical_outputs_have_zero_divergence():
    x = [torch.randn(2, 3, 5)]
    d = compare(x, [x[0].clone()], [None], "kl")
    assert d.mean == 0 and d.secondary == 0 and d.max_abs == 0 and d.bitwise_equal


def test_kl_and_js_match_a_hand_computation():
    p = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    q = torch.log(torch.tensor([[[0.9, 0.1]]], dtype=torch.float64))
    d = compare([p], [q], [None], "kl")
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    m = [0.7, 0.3]
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    )
    assert math.isclose(d.mean, kl, rel_tol=1e-9) and math.isclose(d.secondary, js, rel_tol=1e-9)
    assert d.secondary <= math.log(2)
    assert math.isclose(compare([q], [p], [None], "kl").secondary, d.secondary, rel_tol=1e-12)


def test_masked_positions_do_not_count():
    base = torch.zeros(1, 2, 4)
    other = base.clone()
    other[0, 1] = torch.tensor([5.0, 0, 0, 0])  # differs only at a padded position
    mask = torch.tensor([[1, 0]])
    assert compare([base], [other], [mask], "kl").mean == 0
    assert compare([base], [other], [None], "kl").mean > 0


def test_mse_mode_for_embeddings():
    base, other = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    d = compare([base], [other], [None], "mse")
    assert d.mean == 1.0 and d.per_probe == (1.0, 1.0)


def test_rf_is_one_for_exact_reset_undefined_when_inert_and_clamped():
    adapted = compare([torch.zeros(1, 1, 2)], [torch.tensor([[[1.0, 0.0]]])], [None], "kl")
    exact = compare([torch.zeros(1, 1, 2)], [torch.zeros(1, 1, 2)], [None], "kl")
    worse = compare([torch.zeros(1, 1, 2)], [torch.tensor([[[3.0, 0.0]]])], [None], "kl")
    assert recoverability(adapted, exact, inert=False) == 1.0
    assert recoverability(adapted, exact, inert=True) is None
    assert recoverability(adapted, worse, inert=False) == 0.0


def test_bitwise_equality_compares_bytes_not_values():
    from revreg.verifier.metrics import bitwise_equal

    nan = torch.tensor([float("nan"), 1.0])
    assert bitwise_equal(nan, nan.clone()) and not torch.equal(nan, nan.clone())
    assert not bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0])) and torch.equal(
        torch.tensor([0.0]), torch.tensor([-0.0])
    )
    assert not bitwise_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))


def test_outputs_that_differ_only_in_the_sign_of_zero_are_not_bitwise_equal():
    d = compare([torch.tensor([[[0.0, 1.0]]])], [torch.tensor([[[-0.0, 1.0]]])], [None], "kl")
    assert not d.bitwise_equal and d.mean == 0 and d.max_abs == 0


def test_minus_inf_logits_count_as_zero_probability():
    base = torch.tensor([[[0.0, 1.0, -math.inf]]])
    same_support = torch.tensor([[[1.0, 0.0, -math.inf]]])
    d = compare([base], [same_support], [None], "kl")
    assert math.isfinite(d.mean) and d.mean > 0 and math.isfinite(d.secondary) and d.max_abs == 1.0
    lost = torch.tensor([[[0.0, -math.inf, -math.inf]]])  # a possible token made impossible
    d = compare([base], [lost], [None], "kl")
    assert d.mean == math.inf and 0 < d.secondary <= math.log(2) and d.max_abs == math.inf


def test_divergences_are_named_after_what_they_measure():
    x, y = [torch.zeros(1, 2, 3)], [torch.ones(1, 2, 3)]
    assert compare(x, y, [None], "kl").names == ("kl", "js")
    assert set(compare(x, y, [None], "mse").named()) == {"mse", "cosine"}


def test_rf_is_undefined_when_both_divergences_are_infinite():
    from revreg.verifier.metrics import failed_run

    adapted = compare([torch.tensor([[[0.0, 1.0]]])], [torch.tensor([[[0.0, -math.inf]]])], [None], "kl")
    assert adapted.mean == math.inf
    assert recoverability(adapted, failed_run("kl"), inert=False) is None
