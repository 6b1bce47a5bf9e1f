"""Attach and unload behaviors through forward hooks.

Attaching never writes a model tensor: the behavior's tensors live in the returned handle
(not registered on any module), and one forward hook per attachment point applies them.
Unloading removes every hook and drops every tensor the handle holds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from revreg.artifacts.artifact import BehaviorManifest, VerifiedArtifact, load_artifact, tensors_algorithm
from revreg.artifacts.identity import hash_tensors
from revreg.artifacts.keys import TrustedKey
from revreg.artifacts.sources import tensor_sources, walk_modules
from revreg.errors import BaseMismatch, InputError, IntegrityError
from revreg.verifier.kinds import KINDS


@dataclass(frozen=True)
class Behavior:
    """A verified artifact and its tensors, proven to be the signed ones."""

    manifest: BehaviorManifest
    tensors: dict[str, torch.Tensor]
    digest: str  # the artifact file's sha256
    signer: TrustedKey | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def label(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @functools.cached_property
    def content(self) -> str:
        """What the behavior does, whoever signed which file: its tensors and where they attach.
        Two artifacts with the same content attached together would apply it twice."""
        import json

        where = json.dumps([a.to_dict() for a in self.manifest.attachments], sort_keys=True)
        return f"{self.manifest.tensors_digest} {where}"


def stack_label(behaviors: Sequence[Behavior]) -> str:
    return " + ".join(b.label for b in behaviors)


def one_base(behaviors: Sequence[Behavior]) -> str:
    """The base every behavior of a stack is bound to; members bound to different bases are
    refused (BaseMismatch): a stack runs on one base."""
    bases = sorted({b.manifest.base for b in behaviors})
    if len(bases) != 1:
        raise BaseMismatch(
            f"the stack's behaviors are bound to different bases ({', '.join(bases)}); a stack runs on one base"
        )
    return bases[0]


def load_behavior(path: Path, trusted: Mapping[str, TrustedKey], device: str = "cpu") -> Behavior:
    """Verify an artifact, load its tensors, and hash the loaded tensors against the signed digest,
    so what runs is exactly what was signed even if the file changes after verification."""
    from safetensors.torch import load_file

    verified: VerifiedArtifact = load_artifact(Path(path), trusted)
    tensors = load_file(str(path), device="cpu")
    loaded = hash_tensors(tensor_sources(tensors.items())[0], tensors_algorithm(verified.manifest)).identity
    if loaded != verified.manifest.tensors_digest:
        raise IntegrityError(f"{path} changed after verification: loaded tensors hash to {loaded}")
    return Behavior(verified.manifest, {k: v.to(device) for k, v in tensors.items()}, verified.digest, verified.signer)


@dataclass
class Effect:
    """What one attachment did while attached: how often its hook ran, and the largest change
    it made to its module's output (0 calls: it never reached anything the probes run)."""

    target: str
    kind: str
    calls: int = 0
    max_abs_change: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "kind": self.kind, "calls": self.calls, "max_abs_change": self.max_abs_change}


@dataclass
class Attached:
    """A behavior attached to a model; `unload()` takes it off again."""

    model: nn.Module
    handles: list[RemovableHandle] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    measure: bool = True  # record effects; off after the first cycle, which is the one reported

    def unload(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.tensors.clear()

    @property
    def attached(self) -> bool:
        return bool(self.handles)


class Engine(Protocol):
    """What the protocol needs from an attach/unload implementation."""

    def attach(self, model: nn.Module, behavior: Behavior) -> Attached: ...


class HookEngine:
    """The reversible engine: one forward hook per attachment point."""

    def attach(self, model: nn.Module, behavior: Behavior) -> Attached:
        modules = dict(walk_modules(model))
        attached = Attached(model)
        try:
            for att in behavior.manifest.attachments:
                module = modules.get(att.target)
                if module is None:
                    raise InputError(f"attachment target {att.target!r} is not a module of this model")
                tensors = {role: behavior.tensors[name] for role, name in att.tensors.items()}
                attached.tensors.update({name: behavior.tensors[name] for name in att.tensors.values()})
                effect = Effect(att.target, att.kind)
                attached.effects.append(effect)
                hook = _measured(KINDS[att.kind](module, att, tensors), effect, attached)
                attached.handles.append(module.register_forward_hook(hook))
        except BaseException:
            attached.unload()
            raise
        return attached


def attach_all(engine: Engine, model: nn.Module, behaviors: Sequence[Behavior]) -> list[Attached]:
    """Attach each behavior in order; on any failure the ones already attached come off again,
    so a stack is attached whole or not at all. Errors that are not revreg's are reported as
    bad input naming the behavior."""
    from revreg.errors import RevregError

    parts: list[Attached] = []
    try:
        for b in behaviors:
            try:
                parts.append(engine.attach(model, b))
            except RevregError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                raise InputError(f"cannot attach {b.label} to this model: {reason}") from exc
    except BaseException:
        for part in reversed(parts):
            part.unload()
        raise
    return parts


def _measured(hook: Callable[..., object], effect: Effect, attached: Attached) -> Callable[..., object]:
    """The kind's hook, counting its calls and the size of the change it makes."""

    def measured(module: nn.Module, args: tuple[object, ...], output: object) -> object:
        changed = hook(module, args, output)
        if not attached.measure:
            return changed
        effect.calls += 1
        before, after = _first_tensor(output), _first_tensor(changed)
        if before is not None and after is not None and before.shape == after.shape and before.numel():
            delta = float((after.detach() - before.detach()).abs().max())
            if math.isnan(delta):  # inf - inf: compare element by element, as the metrics do
                from revreg.verifier.metrics import abs_diff

                delta = float(abs_diff(before.detach(), after.detach()).max())
            effect.max_abs_change = max(effect.max_abs_change, delta)
        return changed

    measured.__revreg_hook__ = True  # type: ignore[attr-defined]  # found by handles.foreign_hooks
    return measured


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and output:
        first = next(iter(output.values()))
        return first if isinstance(first, torch.Tensor) else None
    return None
