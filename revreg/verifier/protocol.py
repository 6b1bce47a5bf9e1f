"""The verifier protocol (DESIGN.md): identity check, determinism self-check, k cycles of
attach-run-unload with a full-state fingerprint after each, divergence metrics, verdict."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revreg.artifacts.artifact import utc_timestamp
from revreg.artifacts.identity import TensorManifest
from revreg.artifacts.keys import TrustedKey
from revreg.errors import InputError
from revreg.verifier.engine import Behavior, Engine, HookEngine
from revreg.verifier.environment import environment
from revreg.verifier.fingerprint import Fingerprint, fingerprint
from revreg.verifier.metrics import Divergence, compare, recoverability
from revreg.verifier.runner import Probes, run

INERT_FLOOR = 1e-8  # below this divergence a behavior is treated as having no effect
LEAKAGE_THRESHOLD = 1e-6  # the paper's "exact" threshold for per-probe divergence after reset


# The divergence recorded for a run that raised: infinitely far from the base.
FAILED_RUN = Divergence(float("inf"), float("inf"), (), float("inf"), False)


class BaseMismatch(InputError):
    """The model is not the base the behavior is bound to."""


@dataclass
class CycleResult:
    index: int
    identity_restored: bool
    state_restored: bool
    outputs_bitwise: bool
    adapted_repeatable: bool  # adapted outputs equal those of cycle 0
    state_diff: list[str]
    reset: Divergence
    timings: dict[str, float]


@dataclass
class VerificationResult:
    verdict: str  # PASS, FAIL or INCONCLUSIVE
    reasons: list[str]
    behavior: dict[str, Any]
    probes: dict[str, Any]
    device: str
    cycles: list[CycleResult]
    determinism: dict[str, Any]
    adapted: Divergence | None = None
    reset: Divergence | None = None
    rf: float | None = None
    inert: bool | None = None
    leakage_threshold: float = LEAKAGE_THRESHOLD
    baselines: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""  # UTC, when the protocol ended: the certification's time

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def leakage_flagged(self) -> list[int]:
        if self.reset is None:
            return []
        return [i for i, v in enumerate(self.reset.per_probe) if v > self.leakage_threshold]

    def to_dict(self) -> dict[str, Any]:
        """The certification predicate: JSON values only."""
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "behavior": self.behavior,
            "probes": self.probes,
            "device": self.device,
            "cycles": len(self.cycles),
            "bitwise": {
                "identity": all(c.identity_restored for c in self.cycles) if self.cycles else None,
                "state": all(c.state_restored for c in self.cycles) if self.cycles else None,
                "outputs": all(c.outputs_bitwise for c in self.cycles) if self.cycles else None,
            },
            "determinism": self.determinism,
            "inert": self.inert,
            "metrics": {
                "rf": self.rf,
                "kl_adapted": self.adapted.mean if self.adapted else None,
                "js_adapted": self.adapted.js if self.adapted else None,
                "max_abs_adapted": self.adapted.max_abs if self.adapted else None,
                "kl_reset": self.reset.mean if self.reset else None,
                "js_reset": self.reset.js if self.reset else None,
                "max_abs_reset": self.reset.max_abs if self.reset else None,
                "divergence": self.probes.get("divergence"),
            },
            "leakage": {
                "per_probe": list(self.reset.per_probe) if self.reset else [],
                "threshold": self.leakage_threshold,
                "flagged": self.leakage_flagged,
            },
            "cycle_results": [
                {
                    "index": c.index,
                    "identity_restored": c.identity_restored,
                    "state_restored": c.state_restored,
                    "outputs_bitwise": c.outputs_bitwise,
                    "adapted_repeatable": c.adapted_repeatable,
                    "state_diff": c.state_diff[:20],
                    "kl_reset": c.reset.mean,
                    "max_abs_reset": c.reset.max_abs,
                    "timings": c.timings,
                }
                for c in self.cycles
            ],
            "baselines": self.baselines,
            "timings": self.timings,
            "environment": self.environment,
            "finished_at": self.finished_at,
        }


def check_base(
    model: nn.Module, behavior: Behavior, before: Fingerprint, weights: TensorManifest | None = None
) -> None:
    """Refuse, before anything runs, a model that is not the behavior's base.

    With `weights` (the manifest of the files the model was loaded from), the files must be the
    behavior's base and the live model must hold every one of their tensors bit for bit, by
    name, as a parameter or a buffer (persistent or not: checkpoints written by older library
    versions keep buffers such as BERT's position_ids that newer ones no longer save), with no
    state of its own beyond them. Without it, the live model's own identity must match.
    """
    expected = behavior.manifest.base
    label = f"{behavior.manifest.name}:{behavior.manifest.version}"
    if weights is None:
        actual = before.identity
        if not expected.startswith("sha256:"):
            from revreg.artifacts.sources import identity_of_module

            actual = identity_of_module(model, expected.split(":", 1)[0]).identity
        if actual != expected:
            raise BaseMismatch(f"{label} is bound to base {expected}, but the model is {actual}; refusing to run")
        return
    if weights.identity != expected:
        raise BaseMismatch(
            f"{label} is bound to base {expected}, but the weights are {weights.identity}; refusing to run"
        )
    if weights.algorithm != "sha256":
        raise InputError("verifying against blake3-bound bases is not supported yet; pack with a sha256 identity")
    leaves = {t.name: t.digest for t in weights.tensors}
    differ = sorted(n for n, d in leaves.items() if before.tensors.get(n) != d)
    extra = sorted(n for n in before.identity_names if n not in leaves)
    if differ or extra:
        parts = ([f"{len(differ)} not held as in the files: {', '.join(differ[:5])}"] if differ else []) + (
            [f"{len(extra)} not in the files: {', '.join(extra[:5])}"] if extra else []
        )
        raise BaseMismatch(
            f"the loaded model does not hold exactly the base weights ({'; '.join(parts)}); refusing to run"
        )


def _timed(timings: dict[str, float], key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = round(timings.get(key, 0.0) + now - start, 6)
    return now


def verify(
    model: nn.Module,
    behavior: Behavior,
    probes: Probes,
    *,
    cycles: int = 3,
    device: str = "cpu",
    engine: Engine | None = None,
    baselines: Sequence[str] = (),
    inert_floor: float = INERT_FLOOR,
    weights: TensorManifest | None = None,
) -> VerificationResult:
    if cycles < 1:
        raise InputError("--cycles must be at least 1")
    engine = engine or HookEngine()
    kind = probes.file.manifest.divergence
    timings: dict[str, float] = {}
    t = time.perf_counter()
    before = fingerprint(model)
    t = _timed(timings, "fingerprint", t)
    check_base(model, behavior, before, weights)
    m = behavior.manifest
    result = VerificationResult(
        verdict="PASS",
        reasons=[],
        behavior={
            "name": m.name,
            "version": m.version,
            "digest": behavior.digest,
            "base": m.base,
            "attachments": len(m.attachments),
            "bytes": behavior.nbytes,
        },
        probes={
            "name": probes.name,
            "digest": probes.digest,
            "count": probes.file.manifest.count,
            "output": probes.file.manifest.output,
            "divergence": kind,
        },
        device=device,
        cycles=[],
        determinism={},
        environment=environment(device),
        timings=timings,
    )

    base_out = run(model, probes)
    again = run(model, probes)
    t = _timed(timings, "run_base", t)
    repeat = compare(base_out, again, probes.masks, kind)
    result.determinism = {"repeatable": repeat.bitwise_equal, "max_abs": repeat.max_abs}
    if not repeat.bitwise_equal:
        hint = (
            "set CUBLAS_WORKSPACE_CONFIG=:4096:8 before the process starts and run with --device cuda "
            "(revreg then enables torch.use_deterministic_algorithms and disables TF32 and cudnn benchmark)"
            if device.startswith("cuda")
            else "pin torch.set_num_threads and disable nondeterministic kernels"
        )
        result.determinism["reason"] = f"two runs of the base differ by up to {repeat.max_abs:.3g}; {hint}"
        result.verdict, result.reasons = "INCONCLUSIVE", [f"base model is not bitwise repeatable: {hint}"]
        result.finished_at = utc_timestamp()
        return result

    first_adapted: list[torch.Tensor] | None = None
    worst_reset: Divergence | None = None
    for index in range(cycles):
        ct: dict[str, float] = {}
        c = time.perf_counter()
        handle = engine.attach(model, behavior)
        c = _timed(ct, "attach", c)
        try:
            adapted = run(model, probes)
        finally:
            c = _timed(ct, "run_adapted", c)
            handle.unload()
            c = _timed(ct, "unload", c)
        after = fingerprint(model)
        c = _timed(ct, "fingerprint", c)
        try:
            reset_out: list[torch.Tensor] | None = run(model, probes)
            broken = None
        except Exception as exc:  # a model broken by unload is a finding, not a crash of the verifier
            reset_out, broken = None, f"{type(exc).__name__}: {exc}"
        c = _timed(ct, "run_reset", c)
        if first_adapted is None:
            first_adapted = adapted
            result.adapted = compare(base_out, adapted, probes.masks, kind)
        reset = compare(base_out, reset_out, probes.masks, kind) if reset_out is not None else FAILED_RUN
        diff = before.diff(after) + ([f"the model no longer runs the probes ({broken})"] if broken else [])
        result.cycles.append(
            CycleResult(
                index=index,
                identity_restored=after.identity == before.identity,
                state_restored=not diff,
                outputs_bitwise=reset.bitwise_equal,
                adapted_repeatable=all(torch.equal(a, b) for a, b in zip(first_adapted, adapted, strict=True)),
                state_diff=diff,
                reset=reset,
                timings=ct,
            )
        )
        if worst_reset is None or reset.mean > worst_reset.mean or reset.max_abs > worst_reset.max_abs:
            worst_reset = reset
        for k, v in ct.items():
            timings[k] = round(timings.get(k, 0.0) + v, 6)
        if diff or not reset.bitwise_equal:
            break  # the model is no longer the base: later cycles would measure a different model
    result.reset = worst_reset
    assert result.adapted is not None and worst_reset is not None
    result.inert = result.adapted.bitwise_equal or result.adapted.mean < inert_floor
    result.rf = recoverability(result.adapted, worst_reset, result.inert)

    reasons = []
    for cy in result.cycles:
        if not cy.identity_restored:
            changed = [d for d in cy.state_diff if d.endswith("bytes changed")]
            reasons.append(f"cycle {cy.index}: base identity not restored ({'; '.join(changed[:3])})")
        if not cy.state_restored:
            reasons.append(f"cycle {cy.index}: model state not restored: {'; '.join(cy.state_diff[:3])}")
        if not cy.outputs_bitwise:
            reasons.append(
                f"cycle {cy.index}: probe outputs after unload differ from the base "
                f"(max |delta| {cy.reset.max_abs:.3g})"
            )
        if not cy.adapted_repeatable:
            reasons.append(f"cycle {cy.index}: outputs with the behavior attached differ from cycle 0")
    if result.inert:
        reasons.append(
            f"inert: the behavior does not change the probe outputs (divergence "
            f"{result.adapted.mean:.3g} < {inert_floor:g}); rollback of an invisible change proves nothing"
        )
    if reasons:
        result.verdict, result.reasons = "FAIL", sorted(set(reasons), key=reasons.index)

    if baselines:
        from revreg.verifier.baselines import run_baseline

        b = time.perf_counter()
        for spec in baselines:
            result.baselines.append(run_baseline(model, behavior, probes, spec, base_out, before))
        _timed(timings, "baselines", b)
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 6)
    result.finished_at = utc_timestamp()
    return result


def summary_rows(result: VerificationResult) -> list[tuple[str, str]]:
    """The result table shown by `revreg verify` and `revreg certify`."""

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    def rf(x: float | None) -> str:
        # RF close to 1 hides the residue that matters, so show it: 1 - 7.5e-14, not 1.
        if x is None:
            return "undefined (inert)"
        return "1 (exact)" if x == 1.0 else f"1 - {1.0 - x:.2g}" if x > 0.99 else f"{x:.4f}"

    d = result.to_dict()
    rows = [
        ("verdict", result.verdict),
        ("behavior", f"{result.behavior['name']}:{result.behavior['version']}"),
        ("probes", f"{result.probes['name']} ({result.probes['count']} probes, {result.probes['divergence']})"),
        ("device", result.device),
        ("deterministic", str(result.determinism.get("repeatable"))),
    ]
    if result.cycles:
        b = d["bitwise"]
        rows += [
            ("cycles", str(len(result.cycles))),
            ("bitwise", f"identity {b['identity']}, state {b['state']}, outputs {b['outputs']}"),
            ("RF", rf(result.rf)),
            (
                "adapted",
                f"KL {f(d['metrics']['kl_adapted'])}  JS {f(d['metrics']['js_adapted'])}  "
                f"max|d| {f(d['metrics']['max_abs_adapted'])}",
            ),
            (
                "after reset",
                f"KL {f(d['metrics']['kl_reset'])}  JS {f(d['metrics']['js_reset'])}  "
                f"max|d| {f(d['metrics']['max_abs_reset'])}",
            ),
            (
                "leakage",
                f"{len(result.leakage_flagged)} of {result.probes['count']} probes above {result.leakage_threshold:g}",
            ),
        ]
    for bl in result.baselines:
        rows.append(
            (
                f"baseline {bl['baseline']}",
                f"RF {rf(bl['rf'])}  KL reset {f(bl['kl_reset'])}  max|d| reset {f(bl['max_abs_reset'])}  "
                f"weights restored by subtraction: {bl['weights_bitwise_after_subtract']}",
            )
        )
    rows.append(("time", f"{result.timings.get('total', 0):.2f} s"))
    rows += [("reason", r) for r in result.reasons]
    return rows


def verify_files(
    behavior_path: Path,
    trusted: Mapping[str, TrustedKey],
    probes_path: Path,
    base: Path,
    factory: str | None = None,
    device: str = "cpu",
    cycles: int = 3,
    baselines: Sequence[str] = (),
) -> VerificationResult:
    """The protocol from files on disk: what `revreg verify`, `certify` and workers run."""
    from revreg.verifier.engine import load_behavior
    from revreg.verifier.environment import make_deterministic
    from revreg.verifier.loading import load_base
    from revreg.verifier.runner import load_probes

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    make_deterministic(device)
    behavior = load_behavior(behavior_path, trusted, device)
    model, weights = load_base(base, factory, device)
    return verify(
        model,
        behavior,
        load_probes(probes_path, device),
        cycles=cycles,
        device=device,
        baselines=baselines,
        weights=weights,
    )
