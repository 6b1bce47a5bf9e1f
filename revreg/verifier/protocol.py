"""The verifier protocol (DESIGN.md): identity check, determinism self-check, a reference
fingerprint after warm-up, k cycles of attach-run-unload with a full-state fingerprint after
each, a re-check of the base before anything is blamed on the behavior, metrics, verdict."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revreg import progress
from revreg.artifacts.artifact import utc_timestamp
from revreg.artifacts.identity import TensorManifest
from revreg.artifacts.keys import TrustedKey
from revreg.artifacts.predicate import SCHEMA_VERSION
from revreg.errors import BaseMismatch, InputError, RevregError
from revreg.verifier.engine import Attached, Behavior, Engine, HookEngine, attach_all, one_base, stack_label
from revreg.verifier.environment import environment
from revreg.verifier.fingerprint import Change, Fingerprint, fingerprint
from revreg.verifier.live import LeafCache
from revreg.verifier.metrics import Divergence, bitwise_equal, compare, failed_run, recoverability
from revreg.verifier.runner import Probes, run

INERT_FLOOR = 1e-8  # below this divergence a behavior is treated as having no effect
LEAKAGE_THRESHOLD = 1e-6  # the paper's "exact" threshold for per-probe divergence after reset
RECHECK_RUNS = 3  # runs of the bare base when a cycle fails, before the behavior is blamed


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
    changes: list[Change] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Stability:
    """How the bare base behaves when run again after a failing cycle."""

    self_changes: list[Change]  # state it changes by itself when it runs
    runs: int
    differ_from_base: int  # runs whose outputs are not those of the first base runs
    agree: bool  # all runs gave the same outputs
    broken: str | None  # the base no longer runs at all

    @property
    def outputs_unstable(self) -> bool:
        return not self.agree or 0 < self.differ_from_base < self.runs


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
    base: dict[str, Any] = field(default_factory=dict)  # what the certificate binds besides the identity
    effects: list[dict[str, Any]] = field(default_factory=list)  # per attachment, in cycle 0

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def leakage_flagged(self) -> list[int]:
        if self.reset is None:
            return []
        return [i for i, v in enumerate(self.reset.per_probe) if not v <= self.leakage_threshold]

    def to_dict(self) -> dict[str, Any]:
        """The certification predicate: strict JSON values only. A metric that is not a finite
        number is stored as null, and `non_finite` says which it was and what it was."""
        kind = self.probes.get("divergence", "kl")
        metrics: dict[str, Any] = {"rf": self.rf, "divergence": kind}
        for phase, d in (("adapted", self.adapted), ("reset", self.reset)):
            primary, secondary = d.names if d else _names(kind)
            metrics[f"{primary}_{phase}"] = d.mean if d else None
            metrics[f"{secondary}_{phase}"] = d.secondary if d else None
            metrics[f"max_abs_{phase}"] = d.max_abs if d else None
        primary = _names(kind)[0]
        doc = {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "behavior": self.behavior,
            "base": self.base,
            "attachments_effect": self.effects,
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
            "metrics": metrics,
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
                    f"{primary}_reset": c.reset.mean,
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
        non_finite: dict[str, str] = {}
        clean = _strict_json(doc, "", non_finite)
        if non_finite:
            clean["non_finite"] = non_finite
        return clean


def _names(kind: str) -> tuple[str, str]:
    from revreg.artifacts.predicate import metric_names

    return metric_names(kind)


def _strict_json(value: Any, path: str, non_finite: dict[str, str]) -> Any:
    """A copy with every non-finite float replaced by None and recorded under its path."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite[path] = repr(value)
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v, f"{path}.{k}" if path else str(k), non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v, f"{path}[{i}]", non_finite) for i, v in enumerate(value)]
    return value


def check_base(
    model: nn.Module,
    behavior: Behavior,
    before: Fingerprint,
    weights: TensorManifest | None = None,
    cache: LeafCache | None = None,
) -> None:
    """Refuse, before anything runs, a model that is not the behavior's base.

    With `weights` (the manifest of the files the model was loaded from), the files must be the
    behavior's base and the live model must hold every one of their tensors bit for bit, by
    name, as a parameter or a buffer (persistent or not: checkpoints written by older library
    versions keep buffers such as BERT's position_ids that newer ones no longer save), with no
    state of its own beyond them. A tied tensor may be in the files under any of its names
    (`safetensors.torch.save_model` keeps one). Without weights, the live model must answer to
    the identity by the rule of docs/spec/identity.md: its state_dict, plus any kinds of its
    non-persistent buffers a checkpoint may also hold. `cache` holds the leaves `before` was
    hashed from, so they are not hashed twice.
    """
    expected, label = behavior.manifest.base, behavior.label
    if weights is None:
        from revreg.verifier.live import answers_to

        ok, actual = answers_to(model, expected, cached=cache is not None, cache=cache)
        if not ok:
            raise BaseMismatch(f"{label} is bound to base {expected}, but the model is {actual}; refusing to run")
        return
    if weights.identity != expected:
        raise BaseMismatch(
            f"{label} is bound to base {expected}, but the weights are {weights.identity}; refusing to run"
        )
    if weights.algorithm != "sha256":
        raise InputError("verifying against blake3-bound bases is not supported yet; pack with a sha256 identity")
    leaves = {t.name: t.digest for t in weights.tensors}
    differ = sorted(n for n, d in leaves.items() if before.tensors.get(n) != d and _leaf_as(model, n, before) != d)
    extra = sorted(n for n in before.identity_names if n not in leaves and not (before.tied(n) & leaves.keys()))
    if differ or extra:
        parts = ([f"{len(differ)} not held as in the files: {', '.join(differ[:5])}"] if differ else []) + (
            [f"{len(extra)} not in the files: {', '.join(extra[:5])}"] if extra else []
        )
        raise BaseMismatch(
            f"the loaded model does not hold exactly the base weights ({'; '.join(parts)}); refusing to run"
        )


def _leaf_as(model: nn.Module, name: str, before: Fingerprint) -> str | None:
    """The identity leaf of an aliased tensor under this name of it (a fingerprint keeps the
    leaf under the first name only, and a leaf digest includes the name)."""
    if name not in before.aliases:
        return None
    from revreg.artifacts.identity import hash_tensors
    from revreg.artifacts.sources import module_tensors, tensor_sources

    persistent, optional = module_tensors(model, strict=False)
    tensor: torch.Tensor | None = dict([*persistent, *optional]).get(name)
    if tensor is None:
        return None
    return hash_tensors(tensor_sources([(name, tensor)])[0]).tensors[0].digest


def _timed(timings: dict[str, float], key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = round(timings.get(key, 0.0) + now - start, 6)
    return now


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _run_base(model: nn.Module, probes: Probes) -> list[torch.Tensor]:
    try:
        return run(model, probes)
    except RevregError:
        raise
    except Exception as exc:  # a base that cannot run the probe set is bad input, not a finding
        raise InputError(f"the base model does not run probe set {probes.name}: {_describe_error(exc)}") from exc


def _run_attached(model: nn.Module, probes: Probes, parts: list[Attached], label: str) -> list[torch.Tensor]:
    """The probes with the stack attached; the stack comes off, the last attached first, whatever happens."""
    try:
        return run(model, probes)
    except RevregError:
        raise
    except Exception as exc:
        raise InputError(f"with {label} attached the model does not run the probes: {_describe_error(exc)}") from exc
    finally:
        for part in reversed(parts):
            part.unload()


def _base_facts(model: nn.Module, identity: str, architecture: Mapping[str, Any] | None) -> dict[str, Any]:
    """The base beyond its tensors: its code (class, and config.json or the factory it was
    built with), parameter dtypes and count."""
    cls = type(model)
    params = list(model.parameters())
    return {
        "identity": identity,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        **(architecture or {}),
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "parameters": sum(p.numel() for p in params),
    }


def _positions(outs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> int:
    """Output positions the divergence averages over (unmasked ones)."""
    total = 0
    for out, mask in zip(outs, masks, strict=True):
        total += int((mask != 0).sum()) if mask is not None else out.numel() // max(1, out.shape[-1])
    return total


def _same_shapes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))


def _shapes(outs: list[torch.Tensor]) -> str:
    return ", ".join(str(list(o.shape)) for o in outs[:2]) + (", ..." if len(outs) > 2 else "")


def _recheck(model: nn.Module, probes: Probes, base_out: list[torch.Tensor], runs: int) -> Stability:
    """Run the bare base again: what it changes by itself, and whether its outputs repeat."""
    first = fingerprint(model)
    outs: list[list[torch.Tensor]] = []
    broken = None
    try:
        for _ in range(runs):
            outs.append(run(model, probes))
    except Exception as exc:  # a model that no longer runs is a finding, reported by the caller
        broken = _describe_error(exc)
    second = fingerprint(model)

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(bitwise_equal(x, y) for x, y in zip(a, b, strict=True))

    return Stability(
        self_changes=first.changes(second),
        runs=len(outs),
        differ_from_base=sum(not same(o, base_out) for o in outs),
        agree=all(same(o, outs[0]) for o in outs),
        broken=broken,
    )


def verify(
    model: nn.Module,
    behavior: Behavior | Sequence[Behavior],
    probes: Probes,
    *,
    cycles: int = 3,
    device: str = "cpu",
    engine: Engine | None = None,
    baselines: Sequence[str] = (),
    inert_floor: float = INERT_FLOOR,
    weights: TensorManifest | None = None,
    recheck_runs: int = RECHECK_RUNS,
    architecture: Mapping[str, Any] | None = None,
) -> VerificationResult:
    if cycles < 1:
        raise InputError("--cycles must be at least 1")
    from revreg.verifier.baselines import check_specs

    check_specs(baselines)
    members = (behavior,) if isinstance(behavior, Behavior) else tuple(behavior)
    if not members:
        raise InputError("nothing to verify: give at least one behavior")
    if len({b.digest for b in members}) != len(members):
        raise InputError("a stack names the same behavior twice; attaching it twice would apply it twice")
    one_base(members)
    if len(members) > 1 and baselines:
        raise InputError("mutation baselines run on one behavior, not a stack: verify the members one by one")
    engine = engine or HookEngine()
    kind = probes.file.manifest.divergence
    timings: dict[str, float] = {}
    t = time.perf_counter()
    leaves = LeafCache()
    pristine = fingerprint(model, cache=leaves)
    t = _timed(timings, "fingerprint", t)
    for member in members:
        check_base(model, member, pristine, weights, leaves)
    m = members[0].manifest
    described = [
        {
            "name": b.manifest.name,
            "version": b.manifest.version,
            "digest": b.digest,
            "base": b.manifest.base,
            "attachments": len(b.manifest.attachments),
            "bytes": b.nbytes,
        }
        for b in members
    ]
    label = stack_label(members)
    result = VerificationResult(
        verdict="PASS",
        reasons=[],
        behavior=described[0]
        if len(members) == 1
        else {
            "name": label,
            "version": "stack",
            "digest": None,
            "base": m.base,
            "attachments": sum(d["attachments"] for d in described),
            "bytes": sum(d["bytes"] for d in described),
            "stack": described,
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
        base=_base_facts(model, m.base, architecture),
    )

    phases = progress.Phases(f"verify {label}", 1 + cycles + len(baselines))
    phases.step("determinism check (base run twice)")
    base_out = _run_base(model, probes)
    again = _run_base(model, probes)
    t = _timed(timings, "run_base", t)
    result.probes["positions"] = _positions(base_out, probes.masks)
    # The reference is taken after the base's own runs: state a model installs when it first
    # runs (transformers' output-capturing hooks, say) is the base's, not the behavior's.
    before = fingerprint(model)
    t = _timed(timings, "fingerprint", t)
    warmup = pristine.changes(before)
    repeat = compare(base_out, again, probes.masks, kind)
    result.determinism = {
        "repeatable": repeat.bitwise_equal,
        "max_abs": repeat.max_abs,
        "warmup_changes": [str(c) for c in warmup][:20],
    }
    rewritten = [str(c) for c in warmup if c.subject.startswith("tensor ") and c.field == "bytes"]
    if not repeat.bitwise_equal:
        hint = (
            "set CUBLAS_WORKSPACE_CONFIG=:4096:8 before the process starts and run with --device cuda "
            "(revreg then enables torch.use_deterministic_algorithms and disables TF32 and cudnn benchmark)"
            if device.startswith("cuda")
            else "pin torch.set_num_threads and disable nondeterministic kernels"
        )
        result.determinism["reason"] = f"two runs of the base differ by up to {repeat.max_abs:.3g}; {hint}"
        result.verdict, result.reasons = "INCONCLUSIVE", [f"base model is not bitwise repeatable: {hint}"]
    elif rewritten:
        result.verdict = "INCONCLUSIVE"
        result.reasons = [
            "the base changed its own tensors when it ran, before any behavior was attached, so it is no "
            f"longer the base it was bound to: {'; '.join(rewritten[:3])}"
        ]
    if result.verdict == "INCONCLUSIVE":
        timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 6)
        result.finished_at = utc_timestamp()
        phases.done()
        return result

    first_adapted: list[torch.Tensor] | None = None
    worst_reset: Divergence | None = None
    for index in range(cycles):
        phases.step(f"cycle {index + 1} of {cycles}: attach, run, unload, fingerprint")
        ct: dict[str, float] = {}
        c = time.perf_counter()
        parts = attach_all(engine, model, members)
        for part in parts:
            part.measure = index == 0
        c = _timed(ct, "attach", c)
        adapted = _run_attached(model, probes, parts, label)
        c = _timed(ct, "run_adapted_unload", c)
        if index == 0:
            result.effects = [e.to_dict() for part in parts for e in part.effects]
        after = fingerprint(model)
        c = _timed(ct, "fingerprint", c)
        try:
            reset_out: list[torch.Tensor] | None = run(model, probes)
            broken = None
        except Exception as exc:  # a model broken by unload is a finding, not a crash of the verifier
            reset_out, broken = None, _describe_error(exc)
        c = _timed(ct, "run_reset", c)
        if first_adapted is None:
            first_adapted = adapted
            if not _same_shapes(base_out, adapted):
                raise InputError(
                    f"{label} changes the shape of the probe outputs "
                    f"({_shapes(base_out)} -> {_shapes(adapted)}); there is nothing to compare"
                )
            result.adapted = compare(base_out, adapted, probes.masks, kind)
        if reset_out is not None and not _same_shapes(base_out, reset_out):
            broken = f"its outputs changed shape: {_shapes(base_out)} -> {_shapes(reset_out)}"
            reset_out = None
        reset = compare(base_out, reset_out, probes.masks, kind) if reset_out is not None else failed_run(kind)
        changes = before.changes(after)
        diff = [str(ch) for ch in changes] + ([f"the model no longer runs the probes ({broken})"] if broken else [])
        result.cycles.append(
            CycleResult(
                index=index,
                identity_restored=after.identity == before.identity,
                state_restored=not diff,
                outputs_bitwise=reset.bitwise_equal,
                adapted_repeatable=all(bitwise_equal(a, b) for a, b in zip(first_adapted, adapted, strict=True)),
                state_diff=diff,
                reset=reset,
                timings=ct,
                changes=changes,
            )
        )
        if worst_reset is None or not reset.mean <= worst_reset.mean or not reset.max_abs <= worst_reset.max_abs:
            worst_reset = reset
        for k, v in ct.items():
            timings[k] = round(timings.get(k, 0.0) + v, 6)
        cy = result.cycles[-1]
        if diff or not reset.bitwise_equal or not cy.adapted_repeatable:
            break  # the model is no longer the base: later cycles would measure a different model
    result.reset = worst_reset
    assert result.adapted is not None and worst_reset is not None
    result.inert = result.adapted.bitwise_equal or result.adapted.mean < inert_floor
    result.rf = recoverability(result.adapted, worst_reset, result.inert)
    result.verdict, result.reasons = _verdict(result, model, probes, base_out, recheck_runs, inert_floor)

    if baselines:
        from revreg.verifier.baselines import run_baseline

        b = time.perf_counter()
        for spec in baselines:
            phases.step(f"baseline {spec}")
            result.baselines.append(run_baseline(model, members[0], probes, spec, base_out, before))
        _timed(timings, "baselines", b)
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 6)
    result.finished_at = utc_timestamp()
    phases.done()
    return result


def _verdict(
    result: VerificationResult,
    model: nn.Module,
    probes: Probes,
    base_out: list[torch.Tensor],
    recheck_runs: int,
    inert_floor: float,
) -> tuple[str, list[str]]:
    """FAIL for what the behavior left behind; INCONCLUSIVE where the bare base, run again,
    shows the same change by itself (it rewrites its own state, or its outputs do not repeat)."""
    failing = [
        cy for cy in result.cycles if not cy.state_restored or not cy.outputs_bitwise or not cy.adapted_repeatable
    ]
    reasons: list[str] = []
    own: list[str] = []
    if failing:
        stability = _recheck(model, probes, base_out, recheck_runs)
        base_fields = {(ch.subject, ch.field) for ch in stability.self_changes}
        if stability.self_changes:
            own.append(
                "the base changes its own state whenever it runs, without the behavior: "
                + "; ".join(str(ch) for ch in stability.self_changes[:3])
            )
        if stability.outputs_unstable:
            own.append(
                f"the base alone is not repeatable: of {stability.runs} more runs after unload, "
                f"{stability.differ_from_base} differ from its first runs"
            )
        for cy in failing:
            blamed = [ch for ch in cy.changes if (ch.subject, ch.field) not in base_fields]
            lines = [str(ch) for ch in blamed] + [d for d in cy.state_diff if d.startswith("the model no longer")]
            if blamed and not cy.identity_restored:
                changed = [d for d in lines if d.endswith("bytes changed")]
                reasons.append(f"cycle {cy.index}: base identity not restored ({'; '.join(changed[:3])})")
            if lines:
                reasons.append(f"cycle {cy.index}: model state not restored: {'; '.join(lines[:5])}")
            if not stability.outputs_unstable:
                if not cy.outputs_bitwise:
                    reasons.append(
                        f"cycle {cy.index}: probe outputs after unload differ from the base "
                        f"(max |delta| {cy.reset.max_abs:.3g})"
                    )
                if not cy.adapted_repeatable:
                    reasons.append(f"cycle {cy.index}: outputs with the behavior attached differ from cycle 0")
    adapted = result.adapted
    if result.inert and adapted is not None:
        reasons.append(
            f"inert: the behavior does not change the probe outputs (divergence "
            f"{adapted.mean:.3g} < {inert_floor:g}); rollback of an invisible change proves nothing"
        )
    if reasons:
        return "FAIL", sorted(set(reasons), key=reasons.index) + own
    # A failing cycle is either blamed above or explained by the base here.
    return ("INCONCLUSIVE", own) if own else ("PASS", [])


def summary_rows(result: VerificationResult) -> list[tuple[str, str]]:
    """The result table shown by `revreg verify` and `revreg certify`."""
    from revreg.artifacts.predicate import metric

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    def rf(x: float | None) -> str:
        # RF close to 1 hides the residue that matters, so show it: 1 - 7.5e-14, not 1.
        if x is None:
            return "undefined"
        return "1 (exact)" if x == 1.0 else f"1 - {1.0 - x:.2g}" if x > 0.99 else f"{x:.4f}"

    d = result.to_dict()
    m = d["metrics"]
    rows = [
        ("verdict", result.verdict),
        (
            "behavior",
            f"stack of {len(result.behavior['stack'])}: {result.behavior['name']}"
            if "stack" in result.behavior
            else f"{result.behavior['name']}:{result.behavior['version']}",
        ),
        ("probes", f"{result.probes['name']} ({result.probes['count']} probes, {result.probes['divergence']})"),
        ("device", result.device),
        ("deterministic", str(result.determinism.get("repeatable"))),
    ]
    if result.cycles:
        b = d["bitwise"]

        def pair(phase: str) -> str:
            (n1, v1), (n2, v2) = metric(m, phase), metric(m, phase, secondary=True)
            return f"{n1.upper()} {f(v1)}  {n2.upper()} {f(v2)}  max|d| {f(m[f'max_abs_{phase}'])}"

        rows += [
            ("cycles", str(len(result.cycles))),
            ("bitwise", f"identity {b['identity']}, state {b['state']}, outputs {b['outputs']}"),
            ("RF", rf(result.rf) + (" (inert)" if result.inert else "")),
            ("adapted", pair("adapted")),
            ("after reset", pair("reset")),
            (
                "leakage",
                f"{len(result.leakage_flagged)} of {result.probes['count']} probes above {result.leakage_threshold:g}",
            ),
        ]
        rows += [("non-finite", f"{k} = {v}") for k, v in d.get("non_finite", {}).items() if k.startswith("metrics.")]
        unreached = [e["target"] for e in result.effects if not e["calls"]]
        unchanged = [e["target"] for e in result.effects if e["calls"] and e["max_abs_change"] == 0]
        if result.effects:
            rows.append(
                (
                    "attachments",
                    f"{len(result.effects) - len(unreached) - len(unchanged)} of {len(result.effects)} change their "
                    "module's output"
                    + (f"; never run: {', '.join(unreached[:5])}" if unreached else "")
                    + (f"; no change: {', '.join(unchanged[:5])}" if unchanged else ""),
                )
            )
    for bl in d["baselines"]:
        if bl.get("refused"):
            rows.append((f"baseline {bl['baseline']}", f"refused: {bl['refused']}"))
            continue
        name, reset_value = metric(bl, "reset", divergence=bl.get("divergence"))
        rows.append(
            (
                f"baseline {bl['baseline']}",
                f"RF {rf(bl['rf'])}  {name.upper()} reset {f(reset_value)}  max|d| reset {f(bl['max_abs_reset'])}  "
                f"identity restored by its reset: {bl['identity_after_reset']}  (reset: {bl['reset']})",
            )
        )
    rows.append(("time", f"{result.timings.get('total', 0):.2f} s"))
    rows += [("reason", r) for r in result.reasons]
    return rows


def prepare_device(device: str, deterministic: bool = True) -> None:
    """Refuse a CUDA device this machine lacks; set torch's deterministic switches for it."""
    from revreg.verifier.environment import make_deterministic

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from exc
    if kind not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: revreg verifies on cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if deterministic:
        make_deterministic(device)


def verify_files(
    behavior_path: Path | Sequence[Path],
    trusted: Mapping[str, TrustedKey],
    probes_path: Path,
    base: Path,
    factory: str | None = None,
    device: str = "cpu",
    cycles: int = 3,
    baselines: Sequence[str] = (),
) -> VerificationResult:
    """The protocol from files on disk: what `revreg verify`, `certify` and workers run. Several
    behavior files are a stack, attached in the order given and unloaded together."""
    from revreg.verifier.engine import load_behavior
    from revreg.verifier.loading import load_base
    from revreg.verifier.runner import load_probes

    prepare_device(device)
    paths = [Path(behavior_path)] if isinstance(behavior_path, str | Path) else [Path(p) for p in behavior_path]
    members = [load_behavior(p, trusted, device) for p in paths]
    model, weights = load_base(base, factory, device, one_base(members), stack_label(members))
    return verify(
        model,
        members[0] if len(members) == 1 else members,
        load_probes(probes_path, device),
        cycles=cycles,
        device=device,
        baselines=baselines,
        weights=weights,
        architecture=_architecture(Path(base), factory),
    )


def _architecture(base: Path, factory: str | None) -> dict[str, str]:
    if factory:
        return {"factory": factory}
    import hashlib

    config = base / "config.json"
    return {"config_json": "sha256:" + hashlib.sha256(config.read_bytes()).hexdigest()} if config.is_file() else {}
