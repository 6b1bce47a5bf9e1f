"""Divergence between two runs of a probe set, as in arXiv 2603.02934.

For logits (`kl` probe sets): KL(f0 || f) and Jensen-Shannon over the softmax of the last
dimension, in float64 from log-softmax, averaged over unmasked positions and then over probes.
For embedding outputs (`mse`): mean squared error and cosine distance. RF = 1 - D(f0, f_reset) /
D(f0, f_adapted), clamped to [0, 1]; undefined (None) when the behavior is inert or D is not
finite. Non-finite outputs (-inf logits for impossible tokens) are legitimate: 0 * log 0 counts
as 0, and an element that differs from one that is NaN or infinite is infinitely far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from revreg.artifacts.predicate import METRIC_NAMES

_TINY = torch.finfo(torch.float64).tiny
_SAME_WIDTH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}
_CHUNK_ELEMENTS = 1 << 17  # float64 elements per intermediate: 1 MiB, cache-resident


@dataclass(frozen=True)
class Divergence:
    kind: str  # the probe set's divergence: "kl" or "mse"
    mean: float  # KL (kl) or MSE (mse), averaged over probes
    secondary: float  # Jensen-Shannon (kl) or cosine distance (mse), averaged over probes
    per_probe: tuple[float, ...]  # JS (kl) or MSE (mse) per probe: the leakage score after reset
    max_abs: float  # largest |difference| of any output element (inf where one side is not finite)
    bitwise_equal: bool

    @property
    def names(self) -> tuple[str, str]:
        return METRIC_NAMES[self.kind]

    def named(self) -> dict[str, float]:
        """The two divergences under their own names: {"kl": .., "js": ..} or {"mse": .., "cosine": ..}."""
        primary, secondary = self.names
        return {primary: self.mean, secondary: self.secondary}


def failed_run(kind: str) -> Divergence:
    """The divergence recorded for a run that raised: infinitely far from the base."""
    return Divergence(kind, math.inf, math.inf, (), math.inf, False)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality: NaN equals a NaN with the same bits, -0.0 differs from +0.0."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    # Compared as the widest integers the bytes divide into: the same bytes, several times sooner.
    flat_a, flat_b = a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    width = next(
        w
        for w in (8, 4, 2, 1)
        if flat_a.numel() % w == 0 and flat_a.storage_offset() % w == 0 and flat_b.storage_offset() % w == 0
    )
    as_int = _SAME_WIDTH_INT.get(width, torch.uint8)
    return torch.equal(flat_a.view(as_int), flat_b.view(as_int))


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| per element, 0 where the values are the same (inf - inf would be NaN), inf where
    exactly one side is NaN or the difference is undefined."""
    d = (a - b).abs()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(d), d.nan_to_num(nan=math.inf, posinf=math.inf))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over every dimension but the first, counting only positions where mask != 0."""
    if values.dim() == 1:
        return values
    if mask is None:
        return values.reshape(values.shape[0], -1).mean(dim=1)
    m = (mask != 0).reshape(values.shape[0], -1)
    v = values.reshape(values.shape[0], -1)
    # where() rather than multiplication, so an infinite value at a masked position stays out.
    return torch.where(m, v, torch.zeros_like(v)).sum(dim=1) / m.sum(dim=1).clamp_min(1).to(v.dtype)


def _xlogy_diff(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum over the last dimension of p * (log p - log q), with 0 * anything = 0 (a NaN p, from
    a NaN or +inf logit, stays NaN: that divergence is not a number)."""
    return torch.where(p == 0, torch.zeros_like(p), p * (logp - logq)).sum(dim=-1)


def _log_softmax_and_softmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax and softmax of rows from one exp per element (log_softmax then exp takes two)."""
    shifted = x - x.amax(dim=-1, keepdim=True)
    e = shifted.exp()
    z = e.sum(dim=-1, keepdim=True)
    return shifted.sub_(z.log()), e.div_(z)


def _kl_js_finite(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """KL, JS and max |a - b| of float64 rows of finite logits: every log-probability is finite,
    so the plain formulas need no special cases (an underflowed p multiplies a finite log)."""
    max_abs = float((a - b).abs_().max())
    (logp, pp), (logq, qq) = _log_softmax_and_softmax(a), _log_softmax_and_softmax(b)
    kl = torch.linalg.vecdot(pp, logp - logq)
    # log of m = (p + q) / 2; where both probabilities underflow, their terms are 0 anyway.
    logm = pp.add(qq).mul_(0.5).clamp_min_(_TINY).log_()
    js = 0.5 * (torch.linalg.vecdot(pp, logp.sub_(logm)) + torch.linalg.vecdot(qq, logq.sub_(logm)))
    return kl, js, max_abs


def _kl_js_any(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The same for rows that hold infinities or NaN (-inf logits for impossible tokens)."""
    max_abs = float(abs_diff(a, b).max())
    logp, logq = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
    pp, qq = logp.exp(), logq.exp()
    logm = (0.5 * (pp + qq)).clamp_min_(_TINY).log_()
    js = 0.5 * (_xlogy_diff(pp, logp, logm) + _xlogy_diff(qq, logq, logm))
    return _xlogy_diff(pp, logp, logq), js, max_abs


def _kl_js(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """KL(P || Q) and JS(P, Q) per position over the last dimension in float64, and max |p - q|.

    Rows are processed a few at a time so the float64 intermediates stay in cache, about three
    times sooner on large vocabularies than on the whole tensor. A chunk whose result is not
    finite had non-finite logits and is computed again with the careful formulas.
    """
    lead = p.shape[:-1]
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    kl = torch.empty(p2.shape[0], dtype=torch.float64)
    js = torch.empty(p2.shape[0], dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMENTS // max(1, p2.shape[1]))
    max_abs = 0.0
    if p2.shape[1] == 0:
        return kl.zero_().reshape(lead), js.zero_().reshape(lead), 0.0
    for start in range(0, p2.shape[0], rows):
        a, b = p2[start : start + rows].to(torch.float64), q2[start : start + rows].to(torch.float64)
        k, j, m = _kl_js_finite(a, b)
        if not (math.isfinite(m) and bool(torch.isfinite(k).all()) and bool(torch.isfinite(j).all())):
            k, j, m = _kl_js_any(a, b)
        kl[start : start + rows], js[start : start + rows] = k, j
        max_abs = max(max_abs, m)
    return kl.reshape(lead), js.reshape(lead), max_abs


def compare(
    base: list[torch.Tensor], other: list[torch.Tensor], masks: list[torch.Tensor | None], kind: str
) -> Divergence:
    """Divergence of `other` from `base`, batch by batch (same batches, same shapes)."""
    if kind not in METRIC_NAMES:
        raise ValueError(f"unknown divergence {kind!r}")
    per_probe: list[torch.Tensor] = []
    means: list[torch.Tensor] = []
    secondary: list[torch.Tensor] = []
    max_abs = 0.0
    equal = True
    for p, q, mask in zip(base, other, masks, strict=True):
        if p.shape != q.shape:
            raise ValueError(f"output shapes differ: {tuple(p.shape)} and {tuple(q.shape)}")
        same = bitwise_equal(p, q)
        equal = equal and same
        if same:  # exactly zero, not the rounding residue of log-softmax arithmetic
            zeros = torch.zeros(p.shape[0], dtype=torch.float64)
            means.append(zeros)
            secondary.append(zeros)
            per_probe.append(zeros)
            continue
        if kind == "kl":
            kl, js, batch_max = _kl_js(p.detach(), q.detach())
            max_abs = max(max_abs, batch_max)
            kl_probe, js_probe = _masked_mean(kl.clamp_min(0), mask), _masked_mean(js.clamp_min(0), mask)
            means.append(kl_probe)
            secondary.append(js_probe)
            per_probe.append(js_probe)
        else:
            p64, q64 = p.detach().to(torch.float64), q.detach().to(torch.float64)
            diff = abs_diff(p64, q64)
            max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
            mse = diff.pow(2).mean(dim=-1)
            cos = 1 - torch.nn.functional.cosine_similarity(p64, q64, dim=-1)
            mse_probe = _masked_mean(mse, mask)
            means.append(mse_probe)
            secondary.append(_masked_mean(cos, mask))
            per_probe.append(mse_probe)
    all_means = torch.cat(means)
    return Divergence(
        kind,
        float(all_means.mean()),
        float(torch.cat(secondary).mean()),
        tuple(float(x) for x in torch.cat(per_probe)),
        max_abs,
        equal,
    )


def recoverability(adapted: Divergence, reset: Divergence, inert: bool) -> float | None:
    """RF, or None where it is undefined: an inert behavior, or divergences that are not finite
    numbers on both sides (inf / inf)."""
    if inert or not adapted.mean > 0 or math.isnan(reset.mean):
        return None
    if reset.bitwise_equal:
        return 1.0
    if math.isinf(reset.mean) and math.isinf(adapted.mean):
        return None
    return min(1.0, max(0.0, 1.0 - reset.mean / adapted.mean))
