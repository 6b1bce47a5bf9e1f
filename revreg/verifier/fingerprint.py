"""A full-state fingerprint of a live model and of the process state that changes what it
computes; two fingerprints differ exactly where that state differs, and `diff` names where.

The threat model, what it covers and what no fingerprint can, is in docs/verifier.md.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import random
import struct
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from revreg.artifacts.dtypes import TORCH_TO_SAFETENSORS
from revreg.artifacts.identity import Identity, hash_tensors, root_digest
from revreg.artifacts.sources import module_tensors, tensor_sources, version_of, walk_modules

if TYPE_CHECKING:
    from revreg.verifier.live import LeafCache

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
# Captured through the tensor entries, so not again as attributes.
_MODULE_INTERNALS = frozenset((*_HOOK_DICTS, "_parameters", "_buffers", "_modules", "training"))
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
# Containers longer than this are compared by identity and length only: model attributes are
# small, and a vocabulary-sized list would make every fingerprint slow.
_MAX_ITEMS = 4096
_MAX_DEPTH = 6


class Same:
    """An object compared with `is`, held strongly so its address cannot be reused by another."""

    __slots__ = ("obj", "text")

    def __init__(self, obj: Any, text: str | None = None) -> None:
        self.obj = obj
        self.text = text if text is not None else _describe(obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and self.obj is other.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __repr__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Value:
    """A plain value compared exactly: floats by their bits (NaN equals itself, -0.0 is not 0.0),
    types by identity (1, 1.0 and True differ), containers element by element."""

    key: Any
    text: str = field(compare=False)  # for reports only

    def __repr__(self) -> str:
        return self.text


Token = Same | Value


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str) and callable(obj):
        return f"{type(obj).__name__} {name}"
    return f"<{type(obj).__qualname__}>"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over class, layout, dtype, shape and the values in C order (not the identity
    scheme: for gradients, tensors kept as plain attributes and tensors the scheme does not
    cover, whatever their dtype). Sparse tensors by their index and value tensors; a tensor
    subclass by its bytes as a plain tensor, with its __torch_function__ switched off."""
    h = hashlib.sha256(f"{type(t).__qualname__}|{t.layout}|{t.dtype}|{tuple(t.shape)}|".encode())
    with torch._C.DisableTorchFunctionSubclass():
        plain = t.detach().as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t.detach()
        if plain.layout == torch.sparse_coo:
            parts = [plain._indices(), plain._values()]
        elif plain.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = [plain.crow_indices(), plain.col_indices(), plain.values()]
        elif plain.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = [plain.ccol_indices(), plain.row_indices(), plain.values()]
        else:
            parts = [plain]
        for part in parts:
            h.update(f"|{tuple(part.shape)}|".encode())
            if part.numel():
                flat = part.resolve_neg().resolve_conj().contiguous().reshape(-1).view(torch.uint8)
                h.update(flat.to("cpu").numpy().data)
    return h.hexdigest()


def _in_scheme(t: torch.Tensor) -> bool:
    """A tensor the identity scheme hashes: a plain dense tensor of a scheme dtype, with data."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.device.type != "meta"
        and str(t.dtype) in TORCH_TO_SAFETENSORS
    )


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The address of a dense tensor's storage; None for layouts without one (sparse, meta)."""
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    return int(t.untyped_storage().data_ptr())


def _digest_or_mark(t: torch.Tensor) -> str:
    try:
        return tensor_digest(t)
    except (RuntimeError, TypeError, NotImplementedError):  # meta, or a layout without values
        return f"unreadable {t.layout} on {t.device}"


def _tensor_value(t: torch.Tensor) -> Value:
    digest = _digest_or_mark(t)
    stride = t.stride() if t.layout == torch.strided else None
    return Value(("tensor", digest, str(t.device), stride), f"tensor {t.dtype} {list(t.shape)} ({digest[:12]})")


@dataclass(frozen=True)
class Change:
    """One difference between two fingerprints."""

    subject: str  # "tensor NAME", "module PATH", "object PATH", "class NAME", "torch", ...
    field: str
    before: Token | None  # None: absent
    after: Token | None

    def __str__(self) -> str:
        if self.field == "":
            return f"{self.subject} was {'added' if self.before is None else 'removed'}"
        if self.before is None or self.after is None:
            return f"{self.subject}: {self.field} {'added' if self.before is None else 'removed'}"
        if self.field == "bytes":
            return f"{self.subject}: bytes changed"
        b, a = _short(self.before.text), _short(self.after.text)
        sep = ":" if self.field.startswith("hooks") else ""
        if b == a:
            return f"{self.subject}: {self.field} (replaced)"
        return f"{self.subject}: {self.field}{sep} {b} -> {a}"


_RANK = {"": 0, "bytes": 0, "object": 1, "class": 2, "tied with": 3, "storage shared with": 4, "dtype": 5}


@dataclass(frozen=True)
class Fingerprint:
    tensors: dict[str, str]  # name -> identity leaf digest (aliases share one)
    identity_names: tuple[str, ...]  # state_dict names that make up the identity (aliases excluded)
    state: dict[str, dict[str, Token]]  # subject -> field -> token
    aliases: dict[str, str]  # a later name -> the first name for the same memory

    def canonical(self, name: str) -> str:
        """The name a tensor has in the identity (the first of its aliases)."""
        return self.aliases.get(name, name)

    def tied(self, name: str) -> set[str]:
        """The other names of the same tensor object."""
        token = self.state.get(f"tensor {name}", {}).get("tied with")
        return set(token.key) if isinstance(token, Value) else set()

    @property
    def identity(self) -> Identity:
        """The base identity, from the same leaves (state_dict names are hashed under their own
        names, so their leaves are exactly the identity scheme's)."""
        root = root_digest("sha256", ((n, bytes.fromhex(self.tensors[n])) for n in self.identity_names))
        return Identity(f"sha256:{root.hex()}")

    def changes(self, after: Fingerprint) -> list[Change]:
        out = []
        for subject in sorted(self.state.keys() | after.state.keys()):
            mine, theirs = self.state.get(subject), after.state.get(subject)
            if mine is None or theirs is None:
                out.append(
                    Change(subject, "", None if mine is None else Same(mine), None if theirs is None else Same(theirs))
                )
                continue
            for f in sorted(mine.keys() | theirs.keys()):
                if mine.get(f) != theirs.get(f):
                    out.append(Change(subject, f, mine.get(f), theirs.get(f)))
        # The cause before its consequences: a replaced object also changes the registries and
        # attributes that hold it, and a report shows its first lines.
        return sorted(
            out, key=lambda c: (_RANK.get(c.field, 7 if not c.field.startswith("registered") else 8), c.subject)
        )

    def diff(self, after: Fingerprint) -> list[str]:
        """What changed from this fingerprint to `after`, one line per difference."""
        return [str(c) for c in self.changes(after)]


class _Capture:
    """One pass over a model: plain values by value, everything else by identity, and each
    plain object (an HF config, say) captured once, under the path it was first reached by."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Token]] = {}
        self.seen: set[int] = set()
        self.pending: list[tuple[str, Any, int]] = []

    def value(self, v: Any, path: str, depth: int = 0) -> Token:
        if v is None or (isinstance(v, bool | int | str | bytes) and not isinstance(v, enum.Enum)):
            return Value((type(v), v), _short(repr(v)))
        if isinstance(v, float):
            return Value((type(v), struct.pack("<d", v)), repr(v))
        if isinstance(v, complex):
            return Value((type(v), struct.pack("<dd", v.real, v.imag)), repr(v))
        if isinstance(v, torch.Tensor):
            return _tensor_value(v) if not isinstance(v, nn.Parameter) else Same(v, "a parameter")
        if isinstance(v, torch.device | torch.Size):
            return Value((type(v), str(v)), str(v))
        if isinstance(v, enum.Enum | torch.dtype | torch.layout | torch.memory_format):
            return Same(v, str(v))  # singletons
        if isinstance(v, tuple | list | set | frozenset | dict | collections.deque) and depth < _MAX_DEPTH:
            if len(v) > _MAX_ITEMS:
                return Same(v, f"<{type(v).__name__} of {len(v)}>")
            items: Any
            if isinstance(v, dict):
                items = tuple(
                    (self.value(k, path, depth + 1), self.value(x, f"{path}.{k}", depth + 1)) for k, x in v.items()
                )
            elif isinstance(v, set | frozenset):
                items = tuple(sorted((self.value(x, path, depth + 1) for x in v), key=lambda t: t.text))
            else:
                items = tuple(self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))
            text = _short(repr(v))
            # Mutable containers are also compared by identity: code elsewhere may hold them.
            ident = () if isinstance(v, tuple | frozenset) else (Same(v),)
            return Value((type(v), items, *ident), text)
        if _is_plain_object(v) and id(v) not in self.seen:
            self.seen.add(id(v))
            self.pending.append((path, v, depth))
        return Same(v)

    def objects(self) -> None:
        while self.pending:
            path, obj, depth = self.pending.pop(0)
            fields: dict[str, Token] = {"class": Same(type(obj))}
            for k, v in _attributes(obj).items():
                fields[f"attribute {k}"] = self.value(v, f"{path}.{k}", depth + 1)
            self.state[f"object {path}"] = fields


def _is_plain_object(v: Any) -> bool:
    """Objects whose attributes are state (configs and the like), not code or model parts."""
    if isinstance(v, nn.Module | torch.Tensor | type | types.ModuleType) or callable(v):
        return False
    return hasattr(v, "__dict__") or bool(_slots(type(v)))


def _slots(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        declared = vars(klass).get("__slots__", ())
        names += (
            [declared] if isinstance(declared, str) else [n for n in declared if n not in ("__dict__", "__weakref__")]
        )
    return names


def _attributes(obj: Any) -> dict[str, Any]:
    """An object's instance attributes: its __dict__ and the slots it has set."""
    found = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for name in _slots(type(obj)):
        if name not in found and hasattr(obj, name):
            found[name] = getattr(obj, name)
    return found


def _hooks(d: Any, cap: _Capture, path: str) -> Value:
    if not d:
        return Value((), "0")
    items = tuple((cap.value(k, path), cap.value(fn, path)) for k, fn in d.items())
    return Value(items, str(len(items)))


def _by_value(v: Any) -> Any:
    """A copy of a serialized value with its containers as tuples tagged by type, so that two
    equal values built separately compare equal."""
    if isinstance(v, dict):
        return ("dict", tuple((k, _by_value(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return (type(v).__name__, tuple(_by_value(x) for x in v))
    if isinstance(v, set | frozenset):
        return ("set", frozenset(_by_value(x) for x in v))
    return v


def _extra_state(model: nn.Module) -> dict[str, Any]:
    """What state_dict stores under `<module>._extra_state` for modules that define it."""
    from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

    return {
        f"{path}.{_EXTRA_STATE_KEY_SUFFIX}" if path else _EXTRA_STATE_KEY_SUFFIX: sub.get_extra_state()
        for path, sub in walk_modules(model)
        if type(sub).get_extra_state is not nn.Module.get_extra_state
    }


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every parameter and buffer under every path, from the registries (as walk_modules)."""
    walked = walk_modules(model)
    for path, sub in walked:
        for n, p in vars(sub)["_parameters"].items():
            if p is not None:
                yield (f"{path}.{n}" if path else n), "param", p
    for path, sub in walked:
        for n, b in vars(sub)["_buffers"].items():
            if b is not None:
                yield (f"{path}.{n}" if path else n), "buffer", b


_PRECISION_BACKENDS = (
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
)


def _precision(read: Any) -> str:
    """A precision setting, or what reading it raised (torch's legacy getter raises once the
    per-backend API has set something it cannot express)."""
    try:
        return str(read())
    except RuntimeError as exc:
        return f"unreadable: {str(exc).splitlines()[0][:80]}"


def _global_state(cap: _Capture) -> dict[str, Token]:
    g: dict[str, Any] = {
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "default dtype": torch.get_default_dtype(),
        "default device": str(torch.get_default_device()),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic warn only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill uninitialized memory": torch.utils.deterministic.fill_uninitialized_memory,  # type: ignore[attr-defined]
        "float32 matmul precision": _precision(torch.get_float32_matmul_precision),
        "threads": torch.get_num_threads(),
        # torch has a setter and no getter: a denormal that survives a multiply says it is off.
        "flush denormal": bool((torch.tensor([1e-39]) * 1.0).item() == 0.0),
        "anomaly detection": torch.is_anomaly_enabled(),
        "cpu autocast": torch.is_autocast_enabled("cpu"),
        "cuda autocast": torch.is_autocast_enabled("cuda"),
        "cuda matmul tf32": torch.backends.cuda.matmul.allow_tf32,
        "cuda matmul fp16 reduced precision": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda matmul bf16 reduced precision": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn enabled": torch.backends.cudnn.enabled,
        "cudnn tf32": torch.backends.cudnn.allow_tf32,
        "cudnn benchmark": torch.backends.cudnn.benchmark,
        "cudnn deterministic": torch.backends.cudnn.deterministic,
        "mkldnn enabled": torch.backends.mkldnn.enabled,
        "flash sdp": torch.backends.cuda.flash_sdp_enabled(),
        "mem efficient sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math sdp": torch.backends.cuda.math_sdp_enabled(),
        "torch function modes": torch._C._len_torch_function_stack(),
        "torch dispatch modes": torch._C._len_torch_dispatch_stack(),
    }
    # torch's per-backend precision switches (mkldnn.matmul.fp32_precision = "bf16", say)
    for backend in _PRECISION_BACKENDS:
        owner: Any = torch.backends
        for part in backend.split("."):
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, "fp32_precision"):
            g[f"{backend} fp32 precision"] = _precision(lambda o=owner: o.fp32_precision)
    fields = {k: cap.value(v, "torch") for k, v in g.items()}
    fields["cpu rng state"] = Value(tensor_digest(torch.get_rng_state()), "cpu generator state")
    fields["default generator"] = Same(torch.default_generator, "torch.default_generator")
    if torch.cuda.is_initialized():  # never initialise CUDA just to look at it
        for i in range(torch.cuda.device_count()):
            fields[f"cuda:{i} rng state"] = Value(
                tensor_digest(torch.cuda.get_rng_state(i)), f"cuda:{i} generator state"
            )
    fields["python rng state"] = Value(hashlib.sha256(repr(random.getstate()).encode()).hexdigest(), "python state")
    np = sys.modules.get("numpy")
    if np is not None:
        key = repr(np.random.get_state(legacy=False)).encode()
        fields["numpy rng state"] = Value(hashlib.sha256(key).hexdigest(), "numpy global generator state")
    module_globals = vars(torch.nn.modules.module)
    for name in sorted(k for k in module_globals if k.startswith("_global_")):
        v = module_globals[name]
        fields[f"hooks {name}"] = _hooks(v, cap, "torch") if isinstance(v, dict) else cap.value(v, "torch")
    return fields


def _namespace(ns: Any, label: str) -> dict[str, Token]:
    """What code resolves at call time: a replaced function under the same name is a change."""
    return {f"name {k}": Same(v, f"{label}.{k}") for k, v in vars(ns).items() if not k.startswith("__")}


def fingerprint(model: nn.Module, stream: bool | None = None, cache: LeafCache | None = None) -> Fingerprint:
    """Everything docs/verifier.md's threat model lists, for `model` and the process it runs in.

    The fingerprint holds strong references to the model's objects, so none of them can be
    freed and its address reused while it is kept. `stream` is the identity hashing option.
    Every tensor is hashed; with `cache`, the leaves are also stored there, for later cached
    base checks (a fingerprint itself never reuses a cached leaf).
    """
    cap = _Capture()
    # The persistent tensors first, from the module registries in state_dict order (what identity
    # hashes, so aliases resolve to the names it keeps; no state_dict hook can stand in for
    # them); then every other parameter and buffer (non-persistent buffers).
    persistent, _ = module_tensors(model, strict=False)
    extra_state = _extra_state(model)
    named: list[tuple[str, str, torch.Tensor]] = [(n, "state", t) for n, t in persistent]
    listed = {n for n, _ in persistent}
    for n, kind, t in _named_tensors(model):
        if n not in listed:
            named.append((n, kind, t))
            listed.add(n)
    kinds = {n: k for n, k, _ in _named_tensors(model)}
    # Dtypes outside the identity scheme (complex128, say) still get a digest of their bytes,
    # so a model changed into one is a finding rather than a crash; in an identity they make a
    # leaf no checkpoint has, so such a base is refused by the identity check.
    scheme = [(n, t) for n, _, t in named if _in_scheme(t)]
    if cache is not None:
        digests, aliases = cache.leaves(scheme, stream, reuse=False)
    else:
        sources, aliases = tensor_sources(scheme, stream)
        digests = {t.name: t.digest for t in hash_tensors(sources).tensors}
    digests |= {n: _digest_or_mark(t) for n, _, t in named if not _in_scheme(t)}
    tensors = {name: digests[aliases.get(name, name)] for name, _, _ in named}
    by_object: dict[int, list[str]] = {}
    by_storage: dict[tuple[str, int], list[str]] = {}
    for name, _, t in named:
        by_object.setdefault(id(t), []).append(name)
        ptr = _storage_ptr(t)
        if t.numel() and ptr is not None:
            by_storage.setdefault((str(t.device), ptr), []).append(name)
    for name, _, t in named:
        others = tuple(sorted(n for n in by_object[id(t)] if n != name))
        ptr = _storage_ptr(t)
        dense = ptr is not None
        sharing = by_storage.get((str(t.device), ptr), []) if t.numel() and ptr is not None else []
        fields: dict[str, Token] = {
            "bytes": Value(tensors[name], tensors[name][:12]),
            "kind": cap.value(kinds.get(name, "state"), name),
            "object": Same(t, "tensor object"),
            "class": Same(type(t)),
            "dtype": Same(t.dtype, str(t.dtype)),
            "device": cap.value(t.device, name),
            "shape": cap.value(tuple(t.shape), name),
            "stride": cap.value(t.stride() if dense else None, name),
            "storage offset": cap.value(t.storage_offset() if dense else None, name),
            "storage": Value(_storage_ptr(t), "storage") if t.numel() else Value(None, "none"),
            "requires_grad": cap.value(bool(t.requires_grad), name),
            "version": cap.value(version_of(t), name),
            "tied with": Value(others, ", ".join(others) or "nothing"),
            "storage shared with": Value(
                tuple(sorted(n for n in sharing if n not in others and n != name)),
                ", ".join(sorted(n for n in sharing if n not in others and n != name)) or "nothing",
            ),
        }
        grad = t.grad if t.is_leaf else None
        fields["grad"] = Value(None, "None") if grad is None else _tensor_value(grad)
        fields["grad object"] = Same(grad, "None" if grad is None else "a gradient tensor")
        for h in _TENSOR_HOOKS:
            fields[f"hooks {h}"] = _hooks(getattr(t, h, None), cap, name)
        for k, v in vars(t).items():
            if k not in _TENSOR_HOOKS:
                fields[f"attribute {k}"] = cap.value(v, f"{name}.{k}")
        cap.state[f"tensor {name}"] = fields
    for name, v in extra_state.items():
        # get_extra_state builds its value afresh on every call: compared by value, not identity.
        cap.state[f"extra state {name}"] = {"value": cap.value(_by_value(v), name)}
    identity_names = tuple(n for n, _ in persistent if n not in aliases)

    classes: dict[type, None] = {}
    for path, module in walk_modules(model):
        path = path or "<root>"
        mfields: dict[str, Token] = {
            "object": Same(module, "module object"),
            "class": Same(type(module)),
            "training flag": cap.value(module.training, path),
        }
        for d in _HOOK_DICTS:
            mfields[f"hooks {d}"] = _hooks(getattr(module, d, None), cap, path)
        for registry in ("_parameters", "_buffers", "_modules"):
            entries = getattr(module, registry, {})
            mfields[f"registered {registry[1:]}"] = Value(
                tuple((k, None if v is None else Same(v)) for k, v in entries.items()), ", ".join(entries) or "none"
            )
        for k, v in vars(module).items():
            if k not in _MODULE_INTERNALS:
                mfields[f"attribute {k}"] = cap.value(v, k if path == "<root>" else f"{path}.{k}")
        cap.state[f"module {path}"] = mfields
        for cls in type(module).__mro__:
            if cls is not object:
                classes.setdefault(cls)
    cap.objects()
    for cls in classes:
        cap.state[f"class {_describe(cls)}"] = {
            f"name {k}": Same(v, f"{cls.__qualname__}.{k}") for k, v in vars(cls).items() if k != "__dict__"
        }
    cap.state["torch"] = _global_state(cap)
    cap.state["namespace torch.nn.functional"] = _namespace(torch.nn.functional, "F")
    cap.state["class torch.Tensor"] = _namespace(torch.Tensor, "Tensor")
    return Fingerprint(tensors, identity_names, cap.state, aliases)
