"""Mutation baselines: the same probes through the weight-mutation path, side by side with the
hook path, as in arXiv 2603.02934. Each says what its reset is.

`merge`: the behavior's delta folded into the weights (W += s·BA, W *= scale, b += v), the
probes run, then un-merged by subtraction and division (PEFT's unmerge) and run again: what is
left is a float residue. `noise:SIGMA`: W += N(0, SIGMA²) on every weight a behavior targets,
then the reset a weight-mutation tool can offer without a snapshot: none, since the noise was
never recorded there is nothing known to subtract, so the outputs stay mutated (RF = 0).

Neither writes the model's own tensors: each mutated weight is a private copy put in place of
the module's parameter, so a tied weight changes only where the behavior attaches (as on the
hook path) and is merged once; the model's own parameter objects are put back afterwards and
the model is checked against the reference fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from revreg.artifacts.identity import hash_tensors, root_digest
from revreg.artifacts.sources import tensor_sources
from revreg.errors import InputError
from revreg.verifier.engine import Behavior
from revreg.verifier.fingerprint import Fingerprint, fingerprint
from revreg.verifier.metrics import bitwise_equal, compare, recoverability
from revreg.verifier.runner import Probes, run

MERGE_RESET = "un-merged by subtraction and division (PEFT's unmerge)"
NOISE_RESET = "none: without a snapshot the noise is not known, so there is nothing to subtract"


class Refused(Exception):
    """This behavior cannot be folded into the weights; the message says why."""


def check_specs(specs: Sequence[str]) -> None:
    """Refuse a malformed --baseline before anything runs."""
    for spec in specs:
        _sigma(spec)


def _sigma(spec: str) -> float | None:
    if spec == "merge":
        return None
    if spec.startswith("noise:"):
        try:
            sigma = float(spec.split(":", 1)[1])
        except ValueError:
            sigma = math.nan
        if not math.isfinite(sigma) or sigma < 0:
            raise InputError(f"baseline {spec!r}: noise needs a finite number >= 0, e.g. noise:0.01")
        return sigma
    raise InputError(f"unknown baseline {spec!r}: use merge or noise:SIGMA")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class _Step:
    module: nn.Module
    param: str  # "weight" or "bias"
    op: str  # "add" or "mul"
    operand: torch.Tensor


def _param(module: nn.Module, name: str, what: str) -> torch.Tensor:
    p = module._parameters.get(name)
    if p is None:
        raise Refused(f"{what}: {type(module).__name__} has no {name} to fold into")
    return p


def merge_steps(model: nn.Module, behavior: Behavior) -> list[_Step]:
    """How each attachment folds into its module's weights, in attachment order."""
    modules = dict(model.named_modules())
    steps: list[_Step] = []
    for att in behavior.manifest.attachments:
        module = modules.get(att.target)
        if module is None:
            raise InputError(f"attachment target {att.target!r} is not a module of this model")
        t = {role: behavior.tensors[name] for role, name in att.tensors.items()}
        what = f"{att.kind} on {att.target}"
        linear, conv1d = isinstance(module, nn.Linear), _is_conv1d(module)
        emb, norm = isinstance(module, nn.Embedding), isinstance(module, nn.LayerNorm)
        if att.kind == "lora":
            delta = (t["B"] @ t["A"]) * float(att.scaling or 0.0)  # [out, in] or [dim, vocab]
            if (att.layer == "embedding" and emb) or (att.layer != "embedding" and conv1d):
                delta = delta.T
            elif not (att.layer != "embedding" and linear):
                raise Refused(f"{what}: a {att.layer} LoRA cannot be merged into a {type(module).__name__}")
            steps.append(_Step(module, "weight", "add", delta))
        elif att.kind == "ia3":
            s = t["scale"]
            if linear:
                steps.append(_Step(module, "weight", "mul", s[:, None]))
            elif conv1d or emb:
                steps.append(_Step(module, "weight", "mul", s[None, :]))
            elif norm and module.elementwise_affine:
                steps.append(_Step(module, "weight", "mul", s))
            else:
                raise Refused(
                    f"{what}: ia3 merges into Linear, Conv1D, Embedding or an affine LayerNorm, "
                    f"not a {type(module).__name__} (its output is not one layer's weights)"
                )
            if not emb and module._parameters.get("bias") is not None:
                steps.append(_Step(module, "bias", "mul", s))
        elif att.kind == "steer":
            v = t["vector"]
            if emb:
                if module.max_norm is not None:
                    raise Refused(f"{what}: an Embedding with max_norm renormalizes rows, so a shift cannot be merged")
                steps.append(_Step(module, "weight", "add", v[None, :]))
            elif linear or conv1d or norm:
                _param(module, "bias", what)
                steps.append(_Step(module, "bias", "add", v))
            else:
                raise Refused(
                    f"{what}: steer merges as a bias of Linear, Conv1D or LayerNorm, not a {type(module).__name__}"
                )
        else:
            raise Refused(f"{what}: no merge is defined for kind {att.kind!r}")
        last = steps[-1]
        _param(last.module, last.param, what)
    return steps


def noise_steps(model: nn.Module, behavior: Behavior, sigma: float) -> list[_Step]:
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    steps = []
    for target in sorted({a.target for a in behavior.manifest.attachments}):
        module = modules[target]
        weight = _param(module, "weight", f"noise on {target}")
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * sigma
        steps.append(_Step(module, "weight", "add", noise))
    return steps


def _install_copies(steps: list[_Step]) -> dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """One private copy per (module, parameter), so a weight tied elsewhere is mutated once and
    only here; returns (module, name) -> (module, name, original, copy)."""
    copies: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = {}
    for step in steps:
        key = (id(step.module), step.param)
        if key not in copies:
            original = step.module._parameters[step.param]
            assert original is not None
            copy = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
            copies[key] = (step.module, step.param, original, copy)
            step.module._parameters[step.param] = copy
    return copies


@torch.no_grad()
def _apply(steps: list[_Step], undo: bool) -> None:
    for step in reversed(steps) if undo else steps:
        p = step.module._parameters[step.param]
        assert p is not None
        operand = step.operand.to(p.dtype).to(p.device)
        if step.op == "add":
            p.sub_(operand) if undo else p.add_(operand)
        else:
            p.div_(operand) if undo else p.mul_(operand)


def run_baseline(
    model: nn.Module, behavior: Behavior, probes: Probes, spec: str, base_out: list[torch.Tensor], before: Fingerprint
) -> dict[str, Any]:
    sigma = _sigma(spec)
    try:
        steps = merge_steps(model, behavior) if sigma is None else noise_steps(model, behavior, sigma)
    except Refused as exc:
        return {"baseline": spec, "refused": str(exc)}
    kind = probes.file.manifest.divergence
    # Before the copies go in: which names each weight has, and which are tied.
    names: dict[int, list[str]] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    copies = _install_copies(steps)
    paths = {id(mod): path for path, mod in model.named_modules()}
    tied = []
    for module, param, orig, _ in copies.values():
        own = f"{paths[id(module)]}.{param}"
        if len(names[id(orig)]) > 1:
            tied.append(f"{own} (tied with {', '.join(n for n in names[id(orig)] if n != own)})")
    try:
        _apply(steps, undo=False)
        mutated = run(model, probes)
        if sigma is None:
            _apply(steps, undo=True)
        after_reset = run(model, probes)
        pairs = [(orig.detach(), copy.detach()) for _, _, orig, copy in copies.values()]
        changed = sum(int((~_same_elements(o, c)).sum()) for o, c in pairs)
        max_weight = max((float((o.double() - c.double()).abs().max()) for o, c in pairs if o.numel()), default=0.0)
        identity_after = _identity_with(before, names, copies)
    finally:
        for module, param, original, _ in copies.values():
            module._parameters[param] = original  # type: ignore[assignment]  # the model's own Parameter, put back
    restored = fingerprint(model)
    adapted = compare(base_out, mutated, probes.masks, kind)
    reset = compare(base_out, after_reset, probes.masks, kind)
    primary, secondary = adapted.names
    leftover = before.diff(restored)
    return {
        "baseline": spec,
        "divergence": kind,
        "reset": MERGE_RESET if sigma is None else NOISE_RESET,
        "rf": recoverability(adapted, reset, adapted.bitwise_equal),
        f"{primary}_adapted": adapted.mean,
        f"{secondary}_adapted": adapted.secondary,
        f"{primary}_reset": reset.mean,
        f"{secondary}_reset": reset.secondary,
        "max_abs_adapted": adapted.max_abs,
        "max_abs_reset": reset.max_abs,
        "outputs_bitwise_after_reset": reset.bitwise_equal,
        "weights_bitwise_after_subtract": changed == 0,  # the schema-1 name, for every reset
        "identity_after_reset": identity_after,
        "identity_after_reset_is_base": identity_after == before.identity,
        "weight_elements_changed": changed,
        "max_abs_weight_error": max_weight,
        "tied_merged_once": sorted(tied),  # mutated in a private copy: the other uses keep the base weight
        "leakage_per_probe": list(reset.per_probe),
        "restored_from_snapshot": not leftover,
        "left_after_restore": leftover[:20],
    }


def _same_elements(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: the same bits (NaN = NaN, -0.0 != +0.0)."""
    if a.dtype.is_floating_point and a.element_size() in (2, 4, 8):
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.contiguous().view(ints) == b.contiguous().view(ints)
    return a == b


def _identity_with(
    before: Fingerprint,
    names: dict[int, list[str]],
    copies: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor, torch.Tensor]],
) -> str:
    """The base identity as the mutated model's checkpoint would hash: each mutated weight's
    leaf recomputed from its copy, under the name the base's identity uses for it."""
    leaves = {n: bytes.fromhex(before.tensors[n]) for n in before.identity_names}
    for _, _, original, copy in copies.values():
        name = before.canonical(names[id(original)][0])
        if name in leaves and not bitwise_equal(original.detach(), copy.detach()):
            (digest,) = hash_tensors(tensor_sources([(name, copy)])[0]).tensors
            leaves[name] = bytes.fromhex(digest.digest)
    return f"sha256:{root_digest('sha256', leaves.items()).hex()}"
