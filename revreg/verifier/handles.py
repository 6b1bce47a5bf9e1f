"""Behaviors attached in the user's own process: refused on a model that is not their base,
stackable, and unloaded with proof on request (docs/api.md).

A `Handle` holds the hooks of one `attach` call (one behavior or a stack of them). `unload()`
removes them; `unload(verify=True)` then compares a full fingerprint of the model, hashed
afresh, with the snapshot taken when it was attached, and raises `RollbackError` naming every
difference.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from torch import nn

from revreg.artifacts.sources import walk_modules
from revreg.errors import BaseMismatch, InputError, RollbackError, StackError
from revreg.verifier.engine import Attached, Behavior, Effect, Engine, HookEngine, attach_all, one_base, stack_label
from revreg.verifier.fingerprint import Change, Fingerprint, fingerprint
from revreg.verifier.live import answers_to, cache_of

Check = Literal["cached", "full"]
CHECKS: tuple[str, ...] = ("cached", "full")

# State of the process rather than of the model: the user's own code changes it between attach
# and unload (sampling draws random numbers, inference runs under no_grad), so a library
# snapshot does not compare it. The verifier's protocol does (docs/verifier.md). Autocast is
# compared: a context manager has restored it by the time a block unloads.
PROCESS_FIELDS = frozenset(
    {
        "cpu rng state",
        "python rng state",
        "numpy rng state",
        "grad mode",
        "inference mode",
    }
)


def _model_changes(before: Fingerprint, after: Fingerprint) -> list[Change]:
    return [
        c
        for c in before.changes(after)
        if not (c.subject == "torch" and (c.field in PROCESS_FIELDS or c.field.startswith("cuda:")))
    ]


def _shown(changes: list[Change], limit: int = 5) -> str:
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return "; ".join(str(c) for c in changes[:limit]) + more


@dataclass(frozen=True)
class Snapshot:
    """A model's full state at one moment, to prove later that it is back to it."""

    model: weakref.ref[nn.Module]
    fingerprint: Fingerprint

    def changes(self, model: nn.Module) -> list[Change]:
        """What differs now, from a fingerprint hashed afresh (no cached leaf is trusted)."""
        if self.model() is not model:
            raise InputError("this snapshot was taken of another model")
        return _model_changes(self.fingerprint, fingerprint(model, cache=cache_of(model)))

    def verify(self, model: nn.Module) -> None:
        """Raise RollbackError unless `model` is bit for bit what it was at the snapshot."""
        changes = self.changes(model)
        if changes:
            raise RollbackError(f"the model is not back to its snapshot: {_shown(changes)}", changes)


def snapshot(model: nn.Module) -> Snapshot:
    """Take a snapshot of `model` (parameters, buffers, structure, hooks, attributes), every
    tensor hashed now: a proof compares two fresh readings, never a cached one."""
    return Snapshot(weakref.ref(model), fingerprint(model, cache=cache_of(model)))


# One lock for the stack: checking it and changing it are one step for every thread.
_LOCK = threading.RLock()

# Every handle attached now, oldest first. A handle belongs to every model that contains one of
# its target modules: a copy or a wrapper sharing the modules sees the same stack.
_LIVE: list[Handle] = []


Walked = list[tuple[str, nn.Module]]


def foreign_hooks(model: nn.Module, walked: Walked | None = None) -> list[str]:
    """Modules of `model` that hold a revreg hook no live handle registered there (a deepcopy of
    an attached model copies the hooks but not the handles)."""
    owned = {(id(rh.hooks_dict_ref()), rh.id) for h in _LIVE for part in h._parts for rh in part.handles}
    found = []
    for path, module in walked if walked is not None else walk_modules(model):
        hooks = vars(module).get("_forward_hooks", {})
        for key, fn in hooks.items():
            if getattr(fn, "__revreg_hook__", False) and (id(hooks), key) not in owned:
                found.append(f"module {path or '<root>'}")
    return found


def attached_to(model: nn.Module, walked: Walked | None = None) -> tuple[Handle, ...]:
    """The handles attached to `model` (to any of its modules) now, oldest first."""
    mine = {id(m) for _, m in (walked if walked is not None else walk_modules(model))}
    return tuple(h for h in _LIVE if any(id(t) in mine for t in h.targets))


class Handle:
    """What one `attach` call put on a model. Use as a context manager, or call `unload()`."""

    def __init__(
        self,
        model: nn.Module,
        behaviors: tuple[Behavior, ...],
        parts: list[Attached],
        below: tuple[Handle, ...],
        reference: Snapshot | None,
        walked: Walked,
    ) -> None:
        self.model = model
        self.behaviors = behaviors
        modules = dict(walked)
        self.targets = [modules[a.target] for b in behaviors for a in b.manifest.attachments if a.target in modules]
        self._parts = parts
        self._below = below
        self._reference = reference

    @property
    def attached(self) -> bool:
        return any(p.attached for p in self._parts)

    @property
    def effects(self) -> list[Effect]:
        """Per attachment: how often its hook ran and the largest change it made."""
        return [e for p in self._parts for e in p.effects]

    def __repr__(self) -> str:
        names = ", ".join(b.label for b in self.behaviors)
        return f"<revreg.Handle {names} {'attached' if self.attached else 'unloaded'}>"

    def unload(self, verify: bool | None = None) -> None:
        """Remove this handle's hooks. With verify (by default: when attached with verify=True),
        first check that the stack is as it was when this handle attached (else StackError,
        nothing removed), then prove from a fresh full fingerprint that the model is back to its
        snapshot (else RollbackError)."""
        with _LOCK:
            self._unload(self._reference is not None if verify is None else verify)

    def _unload(self, verify: bool) -> None:
        if self not in _LIVE:
            raise StackError(f"{self!r} is not attached (already unloaded)")
        if verify:
            if self._reference is None:
                raise InputError(
                    "this handle was attached without a snapshot: attach(..., verify=True) to unload with "
                    "proof, or take revreg.snapshot(model) before attaching and call its verify(model) after"
                )
            others = tuple(h for h in attached_to(self.model) if h is not self)
            if others != self._below:
                added = [h for h in others if h not in self._below]
                gone = [h for h in self._below if h not in others]
                reason = (
                    f"{', '.join(repr(h) for h in added)} attached after it is still on: unload that first"
                    if added
                    else f"{', '.join(repr(h) for h in gone)}, on when it attached, has been unloaded since"
                )
                raise StackError(f"cannot prove {self!r} unloaded: {reason} (nothing was unloaded)")
        for part in reversed(self._parts):
            part.unload()
        _LIVE.remove(self)
        if verify:
            assert self._reference is not None
            changes = self._reference.changes(self.model)
            if changes:
                raise RollbackError(
                    f"after unloading {', '.join(b.label for b in self.behaviors)} the model is not back "
                    f"bit for bit: {_shown(changes)}",
                    changes,
                )

    def __enter__(self) -> Handle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self in _LIVE:
            # On an exception inside the block the hooks still come off; the proof is only
            # attempted when the block ended normally, so it never hides the original error.
            try:
                self.unload(verify=None if exc_type is None else False)
            except StackError:
                self.unload(verify=False)  # the block always ends with its behavior off; the proof could not run
                raise


def check_base(
    model: nn.Module, behaviors: Sequence[Behavior], check: str = "cached", walked: Walked | None = None
) -> None:
    """Refuse a stack bound to several bases, or a model that is not their base (BaseMismatch)."""
    if check not in CHECKS:
        raise InputError(f"check={check!r}: use one of {', '.join(CHECKS)}")
    expected = one_base(behaviors)
    ok, actual = answers_to(model, expected, cached=check == "cached", walked=walked)
    if not ok:
        raise BaseMismatch(
            f"{stack_label(behaviors)} is bound to base {expected}, but this model is {actual}; refusing to attach "
            "(nothing was attached)"
        )


def attach(
    model: nn.Module,
    behavior: Behavior | Sequence[Behavior],
    *,
    check: Check = "cached",
    verify: bool = False,
    engine: Engine | None = None,
) -> Handle:
    """Attach one behavior, or a stack of them in order, to `model` with forward hooks.

    Refused (nothing attached) when the model is not every behavior's base, when a behavior is
    already attached to this model, or when a target module is missing. `check="full"` hashes
    the model's tensors now instead of reusing leaves cached while no version counter moved.
    `verify=True` snapshots the model first, so that `unload(verify=True)`, and leaving a
    `with` block, prove the model is back bit for bit.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"attach needs a torch.nn.Module, got {type(model).__name__}")
    behaviors = (behavior,) if isinstance(behavior, Behavior) else tuple(behavior)
    if not behaviors or not all(isinstance(b, Behavior) for b in behaviors):
        raise InputError("attach needs a Behavior (from revreg.load_behavior or registry.pull) or a list of them")
    with _LOCK:
        walked = walk_modules(model)
        foreign = foreign_hooks(model, walked)
        if foreign:
            raise StackError(
                f"{foreign[0]} holds a revreg hook that no attached handle of this model owns (a copy of a model "
                "with behaviors attached?); attach to a model without them (nothing was attached)"
            )
        below = attached_to(model, walked)
        on = {b.content for h in below for b in h.behaviors}
        seen: set[str] = set()
        for b in behaviors:
            if b.content in on or b.content in seen:
                raise StackError(
                    f"{b.label} ({b.digest[:19]}) is already attached to this model, or a behavior with the same "
                    "tensors and attachments is; attaching it twice would apply it twice (nothing was attached)"
                )
            seen.add(b.content)
        # With verify, the snapshot is read first and the base is checked against its fresh leaves:
        # the proof then starts from a model shown to be the base, not from a cached reading.
        reference = snapshot(model) if verify else None
        check_base(model, behaviors, check, walked)
        parts = attach_all(engine or HookEngine(), model, behaviors)
        handle = Handle(model, behaviors, parts, below, reference, walked)
        _LIVE.append(handle)
    return handle
