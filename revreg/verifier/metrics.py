"""Divergence between two runs of a probe set, as in arXiv 2603.02934.

For logits: KL(f0 || f) and Jensen-Shannon over the softmax of the last dimension, computed in
float64 from log-softmax, averaged over unmasked positions and then over probes. For embedding
outputs: mean squared error and cosine distance. RF = 1 - D(f0, f_reset) / D(f0, f_adapted),
clamped to [0, 1]; undefined (None) when the behavior is inert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Divergence:
    mean: float  # KL (kl) or MSE (mse), averaged over probes
    js: float  # Jensen-Shannon (kl) or cosine distance (mse), averaged over probes
    per_probe: tuple[float, ...]  # JS (kl) or MSE (mse) per probe: the leakage score after reset
    max_abs: float  # largest |difference| of any output element
    bitwise_equal: bool


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over every dimension but the first, counting only positions where mask != 0."""
    if values.dim() == 1:
        return values
    if mask is None:
        return values.reshape(values.shape[0], -1).mean(dim=1)
    m = (mask != 0).to(values.dtype).reshape(values.shape[0], -1)
    v = values.reshape(values.shape[0], -1)
    return (v * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


def compare(
    base: list[torch.Tensor], other: list[torch.Tensor], masks: list[torch.Tensor | None], kind: str
) -> Divergence:
    """Divergence of `other` from `base`, batch by batch (same batches, same shapes)."""
    per_probe: list[torch.Tensor] = []
    means: list[torch.Tensor] = []
    js_or_cos: list[torch.Tensor] = []
    max_abs = 0.0
    equal = True
    for p, q, mask in zip(base, other, masks, strict=True):
        if p.shape != q.shape:
            raise ValueError(f"output shapes differ: {tuple(p.shape)} and {tuple(q.shape)}")
        same = torch.equal(p, q)
        equal = equal and same
        if same:  # exactly zero, not the rounding residue of log-softmax arithmetic
            zeros = torch.zeros(p.shape[0], dtype=torch.float64)
            means.append(zeros)
            js_or_cos.append(zeros)
            per_probe.append(zeros)
            continue
        p64, q64 = p.detach().to(torch.float64), q.detach().to(torch.float64)
        diff = (p64 - q64).abs()
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        if kind == "kl":
            logp, logq = torch.log_softmax(p64, dim=-1), torch.log_softmax(q64, dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(dim=-1)
            logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
            js = 0.5 * ((logp.exp() * (logp - logm)).sum(dim=-1) + (logq.exp() * (logq - logm)).sum(dim=-1))
            kl_probe, js_probe = _masked_mean(kl.clamp_min(0), mask), _masked_mean(js.clamp_min(0), mask)
            means.append(kl_probe)
            js_or_cos.append(js_probe)
            per_probe.append(js_probe)
        else:
            mse = (p64 - q64).pow(2).mean(dim=-1)
            cos = 1 - torch.nn.functional.cosine_similarity(p64, q64, dim=-1)
            mse_probe = _masked_mean(mse, mask)
            means.append(mse_probe)
            js_or_cos.append(_masked_mean(cos, mask))
            per_probe.append(mse_probe)
    all_means = torch.cat(means)
    return Divergence(
        float(all_means.mean()),
        float(torch.cat(js_or_cos).mean()),
        tuple(float(x) for x in torch.cat(per_probe)),
        max_abs,
        equal,
    )


def recoverability(adapted: Divergence, reset: Divergence, inert: bool) -> float | None:
    if inert or adapted.mean <= 0:
        return None
    return min(1.0, max(0.0, 1.0 - reset.mean / adapted.mean))
