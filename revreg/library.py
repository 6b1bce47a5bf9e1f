"""revreg's public Python API (docs/api.md). Everything here is re-exported by `revreg`;
modules under revreg.* are internals and may change between versions.

    import revreg

    registry = revreg.open_registry(".revreg")
    tone = registry.pull("support-tone:1.0.0")          # digest, signature, certification checked
    base = revreg.load_base("org/base-model")           # local path or the local Hugging Face cache
    with revreg.attach(base, tone, verify=True):        # refused unless base is tone's base
        ...                                             # leaving the block proves the base is back

Importing `revreg` does not import torch; the functions that need it import it when called.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revreg.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from revreg.artifacts.keys import TrustedKey
    from revreg.registry.api import PushResult, RegistryAPI, VersionDetail, VersionInfo
    from revreg.verifier.engine import Behavior
    from revreg.verifier.handles import Check, Handle, Snapshot
    from revreg.verifier.protocol import VerificationResult
    from revreg.verifier.runner import Probes


class Registry:
    """A registry opened with `open_registry`: the same rules as the CLI, from Python."""

    def __init__(self, api: RegistryAPI) -> None:
        self.api = api  # the full interface (revreg.registry.api.RegistryAPI), for what is not wrapped here

    def __repr__(self) -> str:
        return f"<revreg.Registry {self.api.describe()}>"

    def pull(
        self,
        ref: str,
        *,
        device: str = "cpu",
        allow_unpublished: bool = False,
        allow_yanked: bool = False,
    ) -> Behavior:
        """The behavior REF names, loaded and verified as `revreg pull` verifies it: the bytes
        against the recorded digest, the publisher's signature against the registry's trusted
        keys, and (unless allow_unpublished) its published state and certification; then the
        loaded tensors against the signed digest. Yanked versions are refused unless
        allow_yanked (recorded in the audit log)."""
        from revreg.verifier.engine import load_behavior as _load

        with tempfile.TemporaryDirectory(prefix="revreg-pull-") as tmp:
            path = Path(tmp) / "behavior.safetensors"
            info = self.api.pull(ref, path, allow_unpublished=allow_unpublished, allow_yanked=allow_yanked)
            behavior = _load(path, self.api.trusted("publisher"), device)
        if behavior.digest != info.digest:
            from revreg.errors import IntegrityError

            raise IntegrityError(f"asked for {info.pinned}, loaded {behavior.digest}")
        return behavior

    def push(self, path: str | Path) -> PushResult:
        """Store a signed artifact file (content-addressed; pushing the same bytes again changes nothing)."""
        return self.api.push(Path(path))

    def resolve(self, ref: str) -> VersionInfo:
        """NAME:VERSION, NAME:TAG, NAME@sha256:… -> the version, pinned by digest (`.pinned`)."""
        return self.api.resolve(ref)

    def ls(self, name: str | None = None) -> list[VersionInfo]:
        return self.api.ls(name)

    def show(self, ref: str) -> VersionDetail:
        return self.api.show(ref)


def open_registry(location: str | None = None) -> Registry:
    """A registry directory (SQLite), a database URL, or an http(s):// server; default
    $REVREG_REGISTRY, else ./.revreg. Remote pins ($REVREG_PIN_PUBLISHERS/VERIFIERS) apply."""
    from revreg.registry.locate import open_registry as _open

    return Registry(_open(location))


def _trusted(trusted: Mapping[str, TrustedKey] | Registry | None, keys_dir: str | Path | None) -> dict[str, TrustedKey]:
    if isinstance(trusted, Registry):
        return trusted.api.trusted("publisher")
    if trusted is not None:
        return dict(trusted)
    from revreg.artifacts.keys import Keyring

    return Keyring(Path(keys_dir) if keys_dir is not None else None).trusted()


def load_behavior(
    path: str | Path,
    *,
    trusted: Mapping[str, TrustedKey] | Registry | None = None,
    keys_dir: str | Path | None = None,
    device: str = "cpu",
) -> Behavior:
    """Verify an artifact file's signature and digests and load its tensors. The signer must be
    one of `trusted`: a mapping of key id to key, a Registry (its trusted publishers), or by
    default the local keyring (`keys_dir`, else $REVREG_KEYS, else ~/.config/revreg/keys)."""
    from revreg.verifier.engine import load_behavior as _load

    return _load(Path(path), _trusted(trusted, keys_dir), device)


def load_base(
    base: str | Path,
    *,
    factory: str | None = None,
    device: str = "cpu",
    expect: str | None = None,
) -> nn.Module:
    """A base model, in eval mode: a Hugging Face directory, `org/name[@revision]` from the
    local Hugging Face cache (never downloaded), or a weights file built with `factory`
    ("package.module:function"). With `expect` (an identity), files that are not that base are
    refused before any model is built."""
    from revreg.artifacts.hfcache import resolve_model
    from revreg.verifier.loading import load_base as _load

    model, _ = _load(resolve_model(base), factory, device, expect)
    if expect is not None:
        # The files were the base; the model built from them must be too (a loader may read
        # other files than the ones hashed).
        from revreg.errors import BaseMismatch
        from revreg.verifier.live import answers_to

        ok, actual = answers_to(model, expect, cached=False)
        if not ok:
            raise BaseMismatch(f"the model loaded from {base} is {actual}, not the expected {expect}")
    return model


def identity(model_or_path: nn.Module | str | Path, algorithm: str = "sha256") -> str:
    """The base identity of a live module (its parameters and persistent buffers, as the default
    state_dict lists them) or of model files (a path or
    org/name[@revision] from the local Hugging Face cache)."""
    if isinstance(model_or_path, str | Path):
        from revreg.artifacts.hfcache import resolve_model
        from revreg.artifacts.sources import identity_of_path

        return identity_of_path(resolve_model(model_or_path), algorithm).identity
    from revreg.artifacts.sources import identity_of_module

    return identity_of_module(model_or_path, algorithm).identity


def attach(
    model: nn.Module,
    behavior: Behavior | Sequence[Behavior],
    *,
    check: Check = "cached",
    verify: bool = False,
) -> Handle:
    """Attach a behavior (or a stack, in order) to `model` with forward hooks; see
    revreg.verifier.handles.attach and docs/api.md."""
    from revreg.verifier.handles import attach as _attach

    return _attach(model, behavior, check=check, verify=verify)


def snapshot(model: nn.Module) -> Snapshot:
    """The model's full state now; `snapshot.verify(model)` later raises RollbackError unless the
    model is back to it bit for bit (hashed afresh)."""
    from revreg.verifier.handles import snapshot as _snapshot

    return _snapshot(model)


def _hooked_modules(model: nn.Module) -> list[str]:
    from revreg.artifacts.sources import walk_modules

    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return [
        f"module {path or '<root>'}"
        for path, module in walk_modules(model)
        if any(vars(module).get(name) for name in names)
    ]


def load_probes(path: str | Path, device: str = "cpu") -> Probes:
    from revreg.verifier.runner import load_probes as _load

    return _load(Path(path), device)


def verify(
    model: nn.Module | Callable[[], nn.Module],
    behavior: Behavior | Sequence[Behavior] | str | Path,
    probes: Probes | str | Path,
    *,
    cycles: int = 3,
    device: str = "cpu",
    baselines: Sequence[str] = (),
    deterministic: bool = True,
    trusted: Mapping[str, TrustedKey] | Registry | None = None,
) -> VerificationResult:
    """Run the verifier protocol (what `revreg verify` runs) on a live model, or on the model a
    zero-argument factory builds; the same result object the CLI prints (`.verdict`, `.rf`,
    `.reasons`, `.to_dict()`). A behavior given as a path is loaded with `trusted` (default:
    the local keyring). `deterministic` sets torch's deterministic switches for the process
    first, as the CLI does."""
    import torch

    from revreg.verifier.engine import Behavior as _Behavior
    from revreg.verifier.protocol import prepare_device
    from revreg.verifier.protocol import verify as _verify
    from revreg.verifier.runner import Probes as _Probes

    prepare_device(device, deterministic)
    if isinstance(behavior, str | Path):
        behavior = load_behavior(behavior, trusted=trusted, device=device)
    members: Behavior | Sequence[Behavior] = behavior
    if not isinstance(members, _Behavior) and not all(isinstance(b, _Behavior) for b in members):
        raise InputError("verify needs a Behavior, a list of them, or an artifact path")
    loaded = probes if isinstance(probes, _Probes) else load_probes(probes, device)
    built = model if isinstance(model, torch.nn.Module) else model()
    if not isinstance(built, torch.nn.Module):
        raise InputError(f"the factory returned a {type(built).__name__}, not a torch module")
    from revreg.verifier.handles import attached_to, foreign_hooks

    on = [repr(h) for h in attached_to(built)] + foreign_hooks(built)
    if on:
        from revreg.errors import StackError

        raise StackError(
            f"the model has behaviors attached ({', '.join(on)}): unload them first; verify runs on the bare base"
        )
    hooked = _hooked_modules(built)
    if hooked:
        raise InputError(
            f"the model has forward hooks on {', '.join(hooked[:3])}: a certification is about the base as its "
            "files define it, so verify a model without hooks"
        )
    return _verify(built.to(device), members, loaded, cycles=cycles, device=device, baselines=baselines)


def exported(name: str) -> Any:
    """What `revreg.NAME` is, for a NAME in `revreg.__all__`: an error of revreg.errors, a type
    defined elsewhere (imported only when asked for), or a function or class of this module."""
    from revreg import errors

    if isinstance(getattr(errors, name, None), type):
        return getattr(errors, name)
    if name == "Behavior":
        from revreg.verifier import engine

        return getattr(engine, name)
    if name in ("Handle", "Snapshot"):
        from revreg.verifier import handles

        return getattr(handles, name)
    if name == "VerificationResult":
        from revreg.verifier import protocol

        return protocol.VerificationResult
    if name in globals() and not name.startswith("_"):
        return globals()[name]
    raise AttributeError(name)
