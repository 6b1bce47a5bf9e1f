"""Divergence between two runs of a probe set, as in arXiv 2603.02934.

For logits: KL(f0 || f) and Jensen-Shannon over the softmax of the last dimension, computed in
float64 from log-softmax, averaged over unmasked positions and then over probes. For embedding
outputs: mean squared error and cosine distance. RF = 1 - D(f0, f_reset) / D(f0, f_adapted),
clamped to [0, 1]; undefined (None) when the behavior is inert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = torch.finfo(torch.float64).tiny
_CHUNK_ELEMENTS = 1 << 16  # float64 elements per intermediate: 512 KiB, cache-resident


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


def _kl_js(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """KL(P || Q) and JS(P, Q) per position over the last dimension in float64, and max |p - q|.

    Rows are processed a few at a time so the float64 intermediates stay in cache; the result
    is the same as on the whole tensor, about three times sooner on large vocabularies.
    """
    lead = p.shape[:-1]
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    kl = torch.empty(p2.shape[0], dtype=torch.float64)
    js = torch.empty(p2.shape[0], dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMENTS // max(1, p2.shape[1]))
    max_abs = 0.0
    for start in range(0, p2.shape[0], rows):
        a, b = p2[start : start + rows].to(torch.float64), q2[start : start + rows].to(torch.float64)
        if a.numel():
            max_abs = max(max_abs, float((a - b).abs().max()))
        logp, logq = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
        pp, qq = logp.exp(), logq.exp()
        kl[start : start + rows] = (pp * (logp - logq)).sum(dim=-1)
        # log of m = (p + q) / 2; where both probabilities underflow, their terms are 0 anyway.
        logm = (0.5 * (pp + qq)).clamp_min_(_TINY).log_()
        js[start : start + rows] = 0.5 * ((pp * (logp - logm)).sum(dim=-1) + (qq * (logq - logm)).sum(dim=-1))
    return kl.reshape(lead), js.reshape(lead), max_abs


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
        if kind == "kl":
            kl, js, batch_max = _kl_js(p.detach(), q.detach())
            max_abs = max(max_abs, batch_max)
            kl_probe, js_probe = _masked_mean(kl.clamp_min(0), mask), _masked_mean(js.clamp_min(0), mask)
            means.append(kl_probe)
            js_or_cos.append(js_probe)
            per_probe.append(js_probe)
        else:
            p64, q64 = p.detach().to(torch.float64), q.detach().to(torch.float64)
            max_abs = max(max_abs, float((p64 - q64).abs().max()) if p64.numel() else 0.0)
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
