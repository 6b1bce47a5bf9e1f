"""A full-state fingerprint of a live model: every parameter and buffer (persistent or not),
the module tree with classes and object identities, hook dictionaries, attributes,
requires_grad, dtype, device, storage and training flags. Two fingerprints differ exactly
where the model's state differs, and `diff` names where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from revreg.artifacts.identity import Identity, hash_tensors, root_digest
from revreg.artifacts.sources import tensor_sources

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


@dataclass(frozen=True)
class Fingerprint:
    tensors: dict[str, str]  # name -> digest of dtype, shape and bytes (aliases share one)
    identity_names: tuple[str, ...]  # state_dict names that make up the identity (aliases excluded)
    tensor_meta: dict[str, tuple[Any, ...]]  # name -> (kind, dtype, device, shape, stride, requires_grad, data_ptr)
    modules: dict[str, tuple[Any, ...]]  # path -> (class, object id, training, attributes, hooks)
    global_hooks: tuple[Any, ...]

    @property
    def identity(self) -> Identity:
        """The base identity, from the same leaves (state_dict names are hashed under their own
        names, so their leaves are exactly the identity scheme's)."""
        root = root_digest("sha256", ((n, bytes.fromhex(self.tensors[n])) for n in self.identity_names))
        return Identity(f"sha256:{root.hex()}")

    def diff(self, after: Fingerprint) -> list[str]:
        """What changed from this fingerprint to `after`, one line per difference."""
        out = []
        for label, mine, theirs in (
            ("tensor", self.tensors, after.tensors),
            ("tensor", self.tensor_meta, after.tensor_meta),
            ("module", self.modules, after.modules),
        ):
            for name in sorted(mine.keys() - theirs.keys()):
                out.append(f"{label} {name} was removed")
            for name in sorted(theirs.keys() - mine.keys()):
                out.append(f"{label} {name} was added")
            for name in sorted(n for n in mine.keys() & theirs.keys() if mine[n] != theirs[n]):
                out.append(f"{label} {name}: {_what_changed(mine[name], theirs[name], label, mine is self.tensors)}")
        if self.global_hooks != after.global_hooks:
            out.append("global module hooks changed")
        return sorted(set(out))


_META_FIELDS = ("kind", "dtype", "device", "shape", "stride", "requires_grad", "storage")
_MODULE_FIELDS = ("class", "object (replaced)", "training flag", "attributes", "hooks")


def _what_changed(before: Any, after: Any, label: str, is_bytes: bool) -> str:
    if is_bytes:
        return "bytes changed"
    fields = _META_FIELDS if label == "tensor" else _MODULE_FIELDS
    changed = [f for f, a, b in zip(fields, before, after, strict=True) if a != b]
    details = []
    for field in changed:
        i = fields.index(field)
        if field in ("dtype", "requires_grad", "training flag", "class", "device"):
            details.append(f"{field} {before[i]} -> {after[i]}")
        elif field == "hooks":
            details.append(
                "hooks "
                + ", ".join(
                    f"{n}: {len(b)} -> {len(a)}" for (n, b), (_, a) in zip(before[i], after[i], strict=True) if a != b
                )
            )
        elif field == "attributes":
            added, removed = set(after[i]) - set(before[i]), set(before[i]) - set(after[i])
            details.append(
                "attributes"
                + (f" added {sorted(added)}" if added else "")
                + (f" removed {sorted(removed)}" if removed else "")
            )
        else:
            details.append(field)
    return "; ".join(details)


def fingerprint(model: nn.Module, stream: bool | None = None) -> Fingerprint:
    # state_dict first, so that aliases resolve to the names identity hashing keeps; then
    # every other parameter and buffer (non-persistent buffers, aliases by their other names).
    state = model.state_dict(keep_vars=True)
    kinds = {n: "param" for n, _ in model.named_parameters(remove_duplicate=False)}
    kinds |= {n: "buffer" for n, _ in model.named_buffers(remove_duplicate=False)}
    named = list(state.items())
    named += [(n, t) for n, t in model.named_parameters(remove_duplicate=False) if n not in state]
    named += [(n, t) for n, t in model.named_buffers(remove_duplicate=False) if n not in state]
    sources, aliases = tensor_sources(named, stream)
    digests = {t.name: t.digest for t in hash_tensors(sources).tensors}
    tensors = {name: digests[aliases.get(name, name)] for name, _ in named}
    meta = {
        name: (
            kinds.get(name, "state"),
            str(t.dtype),
            str(t.device),
            tuple(t.shape),
            t.stride(),
            bool(t.requires_grad),
            t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(),
        )
        for name, t in named
    }
    identity_names = tuple(n for n in state if n not in aliases)
    modules = {}
    for path, module in model.named_modules(remove_duplicate=False):
        hooks = tuple((d, tuple(getattr(module, d, {}).keys())) for d in _HOOK_DICTS)
        attributes = tuple(sorted(k for k in vars(module) if k not in ("training",)))
        modules[path or "<root>"] = (type(module).__qualname__, id(module), module.training, attributes, hooks)
    global_hooks = tuple(tuple(getattr(torch.nn.modules.module, g, {}).keys()) for g in _GLOBAL_HOOKS)
    return Fingerprint(tensors, identity_names, meta, modules, global_hooks)
