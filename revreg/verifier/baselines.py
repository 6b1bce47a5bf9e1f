"""Mutation baselines: the same behavior through the weight-mutation path, for comparison.

`merge`: W += delta, run, W -= delta, run (the "reset" most tools offer), then restore W from a
snapshot. `noise:SIGMA`: the same with Gaussian noise of standard deviation SIGMA as the delta.
The report shows what subtraction leaves behind; the snapshot restore puts the base back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from revreg.errors import InputError
from revreg.verifier.engine import Behavior
from revreg.verifier.fingerprint import Fingerprint, fingerprint
from revreg.verifier.metrics import compare, recoverability
from revreg.verifier.runner import Probes, run


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def merge_deltas(model: nn.Module, behavior: Behavior) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """(parameter, operation, operand) triples that fold the behavior into the weights."""
    modules = dict(model.named_modules())
    out: list[tuple[torch.Tensor, str, torch.Tensor]] = []
    for att in behavior.manifest.attachments:
        module = modules.get(att.target)
        if module is None:
            raise InputError(f"attachment target {att.target!r} is not a module of this model")
        t = {role: behavior.tensors[name] for role, name in att.tensors.items()}
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if att.kind == "lora":
            delta = (t["B"] @ t["A"]) * float(att.scaling or 0.0)  # [out, in] or [dim, vocab]
            if att.layer == "embedding" or _is_conv1d(module):
                delta = delta.T
            out.append((weight, "add", delta.to(weight.dtype)))
        elif att.kind == "ia3":
            scale = t["scale"]
            out.append((weight, "mul", (scale[None, :] if _is_conv1d(module) else scale[:, None]).to(weight.dtype)))
            if bias is not None:
                out.append((bias, "mul", scale.to(bias.dtype)))
        elif att.kind == "steer":
            if bias is None:
                raise InputError(f"merge baseline: steer on {att.target} needs a bias to fold into")
            out.append((bias, "add", t["vector"].to(bias.dtype)))
    return out


def noise_deltas(model: nn.Module, behavior: Behavior, sigma: float) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    out = []
    for target in sorted({a.target for a in behavior.manifest.attachments}):
        weight = getattr(modules.get(target), "weight", None)
        if weight is None:
            raise InputError(f"noise baseline: {target} has no weight")
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * sigma
        out.append((weight, "add", noise.to(weight.dtype).to(weight.device)))
    return out


@torch.no_grad()
def _apply(deltas: list[tuple[torch.Tensor, str, torch.Tensor]], undo: bool) -> None:
    for param, op, operand in deltas:
        if op == "add":
            param.sub_(operand) if undo else param.add_(operand)
        else:
            param.div_(operand) if undo else param.mul_(operand)


def run_baseline(
    model: nn.Module, behavior: Behavior, probes: Probes, spec: str, base_out: list[torch.Tensor], before: Fingerprint
) -> dict[str, Any]:
    if spec == "merge":
        deltas = merge_deltas(model, behavior)
    elif spec.startswith("noise:"):
        try:
            sigma = float(spec.split(":", 1)[1])
        except ValueError as exc:
            raise InputError(f"baseline {spec!r}: noise needs a number, e.g. noise:0.01") from exc
        deltas = noise_deltas(model, behavior, sigma)
    else:
        raise InputError(f"unknown baseline {spec!r}: use merge or noise:SIGMA")
    kind = probes.file.manifest.divergence
    snapshot = [(p, p.detach().clone()) for p, _, _ in deltas]
    try:
        _apply(deltas, undo=False)
        merged = run(model, probes)
        _apply(deltas, undo=True)
        subtracted = run(model, probes)
        changed = sum(int((p.detach() != s).sum()) for p, s in snapshot)
        max_weight = max((float((p.detach() - s).abs().max()) for p, s in snapshot if p.numel()), default=0.0)
        after_subtract = fingerprint(model)
    finally:
        with torch.no_grad():
            for p, s in snapshot:
                p.copy_(s)
    restored = fingerprint(model)
    adapted = compare(base_out, merged, probes.masks, kind)
    reset = compare(base_out, subtracted, probes.masks, kind)
    inert = adapted.bitwise_equal
    return {
        "baseline": spec,
        "rf": recoverability(adapted, reset, inert),
        "kl_adapted": adapted.mean,
        "kl_reset": reset.mean,
        "js_reset": reset.js,
        "max_abs_adapted": adapted.max_abs,
        "max_abs_reset": reset.max_abs,
        "outputs_bitwise_after_subtract": reset.bitwise_equal,
        "weights_bitwise_after_subtract": after_subtract.identity == before.identity,
        "weight_elements_changed": changed,
        "max_abs_weight_error": max_weight,
        "leakage_per_probe": list(reset.per_probe),
        "restored_from_snapshot": restored.identity == before.identity and not before.diff(restored),
    }
