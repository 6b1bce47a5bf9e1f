"""A live model's base identity, cheap to ask again: per-tensor leaves cached while the tensors'
version counters say nothing was written, and the matching rule for checkpoints that also keep
non-persistent buffers (docs/spec/identity.md, "Live module").

What the cache can and cannot see is stated in docs/api.md: writes through autograd (in-place
ops, `copy_`, `load_state_dict`, optimizer steps) bump a tensor's version counter and are seen;
writes that bypass it (`tensor.data.add_()`, numpy or DLPack views, raw storage) are not. The
verifier's protocol and `unload(verify=True)` never use the cache for what they prove.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from revreg.artifacts.dtypes import TORCH_TO_SAFETENSORS
from revreg.artifacts.identity import Identity, hash_tensors, root_digest
from revreg.artifacts.sources import (
    distinct_tensors,
    identity_of_module,
    live_source,
    module_tensors,
    version_of,
    view_key,
)
from revreg.errors import InputError

# Non-persistent buffers are grouped by the last component of their name (every layer's
# `inv_freq` is one group); a checkpoint writer keeps a kind of buffer everywhere or nowhere.
# Up to this many groups every combination is tried, beyond it only none and all.
MAX_GROUPS = 10


def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What must be unchanged for a cached leaf of `t` to be reused, or None when `t` cannot be
    cached (inference tensors have no version counter)."""
    version = version_of(t)
    return None if version is None else (version, view_key(t))


@dataclass
class _Entry:
    # The tensor itself, held: an id() or address can be reused by a new tensor once the old
    # one is freed. (Not a weak reference: torch.utils.swap_tensors refuses tensors that have
    # one.) A replaced tensor is released when its name is next checked, or with the model.
    tensor: torch.Tensor
    storage: StorageWeakRef | None  # the storage itself, not its address: a freed address is reused
    key: tuple[Any, ...]
    leaf: str

    def valid_for(self, tensor: torch.Tensor) -> bool:
        if self.tensor is not tensor or self.key != _key(tensor):
            return False
        if self.storage is None:
            return not tensor.numel()
        # A live weak reference to the same storage impl: an expired one whose address was
        # reused by a new storage never matches.
        return not self.storage.expired() and self.storage == StorageWeakRef(tensor.untyped_storage())


class LeafCache:
    """Identity leaves of one model's tensors, by name, each valid while the same tensor object
    has the same version counter, storage, layout and dtype."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.hashed = 0  # tensors hashed (not reused) by the last call, for tests and benchmarks
        self.last: tuple[Any, LiveIdentity] | None = None  # live_identity's last leaves and result

    def leaves(
        self, named: Sequence[tuple[str, torch.Tensor]], stream: bool | None = None, reuse: bool = True
    ) -> tuple[dict[str, str], dict[str, str]]:
        """{name: leaf hex} for every distinct tensor of `named` (scheme dtypes only), and the
        aliases (later name -> first name for the same memory). With reuse=False every tensor is
        hashed and the cache refreshed from what was read."""
        distinct, aliases = distinct_tensors(named)
        known: dict[str, str] = {}
        missing: dict[str, torch.Tensor] = {}
        for name, tensor in distinct.items():
            entry = self._entries.get(name)
            if reuse and entry is not None and entry.valid_for(tensor):
                known[name] = entry.leaf
            else:
                missing[name] = tensor
        # Keys are taken before hashing: a write during hashing bumps the counter and the next
        # call hashes again rather than trusting a leaf of bytes that moved.
        keys = {name: _key(t) for name, t in missing.items()}
        sources = [live_source(name, t, stream) for name, t in missing.items()]
        fresh = {t.name: t.digest for t in hash_tensors(sources).tensors} if sources else {}
        self.hashed = len(sources)
        for name, leaf in fresh.items():
            key, t = keys[name], missing[name]
            if key is None:
                self._entries.pop(name, None)
            else:
                storage = StorageWeakRef(t.untyped_storage()) if t.numel() else None
                self._entries[name] = _Entry(t, storage, key, leaf)
        return known | fresh, aliases


_CACHES: weakref.WeakKeyDictionary[nn.Module, LeafCache] = weakref.WeakKeyDictionary()


def cache_of(model: nn.Module) -> LeafCache:
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = LeafCache()
    return cache


@dataclass(frozen=True)
class LiveIdentity:
    """A live model's identity (its persistent tensors) and the identities it also answers to:
    those of checkpoints that hold them plus some kinds of its non-persistent buffers."""

    identity: Identity
    candidates: frozenset[str]
    optional: tuple[str, ...]  # the non-persistent buffer names that may be in a checkpoint

    def matches(self, expected: str) -> bool:
        return expected in self.candidates


def live_identity(
    model: nn.Module,
    cached: bool = True,
    stream: bool | None = None,
    cache: LeafCache | None = None,
    walked: list[tuple[str, nn.Module]] | None = None,
) -> LiveIdentity:
    """The identity of `model` as revreg.attach checks it: leaves from the model's cache (or
    `cache`) when `cached` and no version counter moved, else hashed now (and the cache
    refreshed)."""
    state, optional = module_tensors(model, walked=walked)
    for name, t in state:
        if str(t.dtype) not in TORCH_TO_SAFETENSORS:
            raise InputError(f"tensor {name!r} has dtype {t.dtype}, which revreg cannot hash: no base identity")
    optional = [(n, t) for n, t in optional if str(t.dtype) in TORCH_TO_SAFETENSORS]
    store = cache or cache_of(model)
    leaves, aliases = store.leaves([*state, *optional], stream, reuse=cached)
    core_hex = tuple((n, leaves[n]) for n, _ in state if n not in aliases)
    opt_hex = tuple((n, leaves[n]) for n, _ in optional if n not in aliases)
    if store.last is not None and store.last[0] == (core_hex, opt_hex):
        return store.last[1]  # the same leaves under the same names: the same roots
    result = _identity_of([(n, bytes.fromhex(h)) for n, h in core_hex], [(n, bytes.fromhex(h)) for n, h in opt_hex])
    store.last = ((core_hex, opt_hex), result)
    return result


def answers_to(
    model: nn.Module,
    expected: str,
    cached: bool = True,
    cache: LeafCache | None = None,
    walked: list[tuple[str, nn.Module]] | None = None,
) -> tuple[bool, str]:
    """Whether `model` answers to the base identity `expected`, and the model's own identity."""
    algorithm = expected.split(":", 1)[0]
    if algorithm == "sha256":
        live = live_identity(model, cached=cached, cache=cache, walked=walked)
        return live.matches(expected), live.identity
    actual = identity_of_module(model, algorithm).identity
    return actual == expected, actual


def _identity_of(core: list[tuple[str, bytes]], opt: list[tuple[str, bytes]]) -> LiveIdentity:
    identity = Identity(f"sha256:{root_digest('sha256', core).hex()}")
    groups: dict[str, list[tuple[str, bytes]]] = {}
    for name, leaf in opt:
        groups.setdefault(name.rsplit(".", 1)[-1], []).append((name, leaf))
    kinds = sorted(groups)
    if len(kinds) <= MAX_GROUPS:
        subsets: Iterable[tuple[str, ...]] = itertools.chain.from_iterable(
            itertools.combinations(kinds, r) for r in range(len(kinds) + 1)
        )
    else:
        subsets = [(), tuple(kinds)]
    candidates = {
        f"sha256:{root_digest('sha256', core + [x for k in subset for x in groups[k]]).hex()}" for subset in subsets
    }
    return LiveIdentity(identity, frozenset(candidates), tuple(n for n, _ in opt))
