"""Where tensors come from for identity hashing: a safetensors file, a sharded checkpoint,
a Hugging Face model directory, or a live torch module (imported lazily)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revreg.artifacts.canonical import strict_loads
from revreg.artifacts.dtypes import TORCH_TO_SAFETENSORS
from revreg.artifacts.identity import CHUNK_SIZE, TensorManifest, TensorSource, hash_tensors
from revreg.artifacts.safetensors_io import InfoFields, MappedFile, TensorInfo
from revreg.errors import FormatError, InputError

if TYPE_CHECKING:
    import torch


@dataclass
class MappedSource(InfoFields):
    """A tensor inside a mapped safetensors file, read without copying."""

    file: MappedFile
    info: TensorInfo

    def chunk(self, index: int) -> memoryview:
        lo = index * CHUNK_SIZE
        hi = min(lo + CHUNK_SIZE, self.info.nbytes)
        self.file.prefetch(self.info, lo, hi)
        return self.file.view(self.info, lo, hi)

    def done(self, index: int) -> None:
        lo = index * CHUNK_SIZE
        self.file.drop(self.info, lo, min(lo + CHUNK_SIZE, self.info.nbytes))


def _shard_files(index_path: Path) -> dict[Path, set[str]]:
    try:
        doc = strict_loads(index_path.read_bytes(), str(index_path))
    except OSError as exc:
        raise InputError(f"cannot read {index_path}: {exc.strerror}") from exc
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index_path}: no weight_map of tensor name -> shard file")
    files: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        if Path(shard).name != shard:
            raise FormatError(f"{index_path}: shard {shard!r} is not a plain file name")
        files.setdefault(index_path.parent / shard, set()).add(name)
    return files


def resolve_weights(path: Path) -> Path:
    """The safetensors file or shard index that holds a model's weights."""
    path = Path(path)
    if path.is_dir():
        index, single = path / "model.safetensors.index.json", path / "model.safetensors"
        if index.is_file() and single.is_file():
            # Loaders disagree on which of the two wins; hashing one while another is loaded
            # would bind the identity to files the model does not hold.
            raise InputError(f"{path} holds both {index.name} and {single.name}: keep one checkpoint")
        for candidate in (index, single):
            if candidate.is_file():
                return candidate
        found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if found:
            raise InputError(f"{path} holds several safetensors checkpoints: name one of them")
        raise InputError(
            f"no safetensors weights in {path}: revreg reads model.safetensors or a shard index "
            "(save with safe_serialization=True)"
        )
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.name.endswith(".json") and not path.name.endswith(".index.json"):
        raise InputError(f"{path} is JSON but not a *.safetensors.index.json shard index")
    return path


@contextmanager
def open_checkpoint(path: Path) -> Iterator[list[TensorSource]]:
    """Sources for every tensor of a checkpoint (file, shard index, or model directory)."""
    weights = resolve_weights(path)
    with ExitStack() as stack:
        if weights.name.endswith(".index.json"):
            sources: list[TensorSource] = []
            for shard, expected in sorted(_shard_files(weights).items()):
                if not shard.is_file():
                    raise InputError(f"{weights}: shard {shard.name} is missing")
                mapped = stack.enter_context(MappedFile(shard))
                names = {t.name for t in mapped.header.tensors}
                if names != expected:
                    raise FormatError(
                        f"{shard}: tensors do not match the shard index "
                        f"({len(expected - names)} missing, {len(names - expected)} unlisted)"
                    )
                sources.extend(MappedSource(mapped, t) for t in mapped.header.tensors)
        else:
            mapped = stack.enter_context(MappedFile(weights))
            sources = [MappedSource(mapped, t) for t in mapped.header.tensors]
        yield sources


def identity_of_path(
    path: Path, algorithm: str = "sha256", progress: Callable[[int], None] | None = None
) -> TensorManifest:
    with open_checkpoint(path) as sources:
        return hash_tensors(sources, algorithm, progress=progress)


@dataclass
class LiveSource:
    """A live tensor. CPU tensors are read in place; other devices stream chunk by chunk to
    the host, so hashing a GPU model never holds more than a few chunks in host memory."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    flat: torch.Tensor  # contiguous, uint8, one dimension
    stream: bool

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())

    def chunk(self, index: int) -> Any:
        piece = self.flat[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
        if self.stream:
            piece = piece.to("cpu", copy=True)
        return piece.numpy().data

    def done(self, index: int) -> None:
        return None


def version_of(t: torch.Tensor) -> int | None:
    """The autograd version counter, read through torch's own getter (a subclass property cannot
    answer for it); None for inference tensors, which have none."""
    import torch

    getter: Any = vars(torch._C.TensorBase)["_version"]
    try:
        return int(getter.__get__(t))
    except RuntimeError:
        return None


def view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same values by construction: the same memory read the same way."""
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.is_neg(),
        t.is_conj(),
    )


def distinct_tensors(
    named: Iterable[tuple[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct memory once, under its first name, and the aliases (a later name -> that
    first name). Empty tensors are never aliases: they hold no memory to share."""
    first: dict[tuple[Any, ...], str] = {}
    distinct: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in named:
        if tensor.numel():
            key = view_key(tensor)
            if key in first:
                aliases[name] = first[key]
                continue
            first[key] = name
        distinct[name] = tensor
    return distinct, aliases


def live_source(name: str, tensor: torch.Tensor, stream: bool | None = None) -> LiveSource:
    """A source for one live tensor; `stream` forces (True) or forbids (False) the chunked
    device-to-host path, by default used for every tensor not on the CPU."""
    t = tensor.detach()
    dtype = TORCH_TO_SAFETENSORS.get(str(t.dtype))
    if dtype is None:
        raise InputError(f"tensor {name!r} has dtype {t.dtype}, which revreg cannot hash")
    # A lazily negated or conjugated view holds other values than its storage's bytes.
    flat = t.resolve_neg().resolve_conj().contiguous().reshape(-1).view(torch_uint8())
    on_device = t.device.type != "cpu"
    return LiveSource(name, dtype, tuple(t.shape), flat, on_device if stream is None else stream)


def tensor_sources(
    named: Iterable[tuple[str, torch.Tensor]], stream: bool | None = None
) -> tuple[list[TensorSource], dict[str, str]]:
    """Sources for named live tensors, each distinct memory hashed once, and the aliases."""
    distinct, aliases = distinct_tensors(named)
    return [live_source(n, t, stream) for n, t in distinct.items()], aliases


def walk_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every (path, module) under `module`, pre-order, a module shared under two paths listed
    under both, read from each module's own `_modules` registry in its instance dict: no method
    the model defines (`named_modules`, `__getattr__`, a property) is called, so a model cannot
    show a walk other than the one its forward uses."""
    import torch

    out: list[tuple[str, torch.nn.Module]] = []
    # An explicit stack (path, module, ids on the path to it): no recursion limit, cycles refused.
    stack: list[tuple[str, torch.nn.Module, frozenset[int]]] = [("", module, frozenset())]
    while stack:
        path, mod, above = stack.pop()
        if id(mod) in above:
            raise InputError(f"module {path or '<root>'} contains itself: revreg cannot walk a cyclic model")
        out.append((path, mod))
        children = _registry(mod, "_modules")
        if not children:
            continue
        here = above | {id(mod)}
        prefix = f"{path}." if path else ""
        for name, child in reversed(children.items()):
            if child is None:
                continue
            if not isinstance(child, torch.nn.Module):
                raise InputError(f"{path or '<root>'}._modules[{name!r}] is not a torch module")
            stack.append((prefix + name, child, here))
    return out


def _registry(mod: torch.nn.Module, name: str) -> dict[str, Any]:
    table = vars(mod).get(name)
    if not isinstance(table, dict):
        raise InputError(f"{type(mod).__name__} has no {name} registry: not a torch module revreg can read")
    return table


def plain_tensor(name: str, t: Any) -> torch.Tensor:
    """`t` if it is a plain tensor or Parameter on a device with bytes, else an InputError: a
    tensor subclass can answer `detach()` or `_version` with what it likes, and sparse or meta
    tensors have no bytes to hash."""
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor)):
        raise InputError(f"tensor {name!r} is a {type(t).__qualname__}; revreg reads plain tensors and Parameters only")
    if t.layout != torch.strided or t.device.type == "meta":
        raise InputError(f"tensor {name!r} is {t.layout} on {t.device}; revreg hashes dense tensors with data only")
    return t


def module_tensors(
    module: torch.nn.Module, strict: bool = True, walked: list[tuple[str, torch.nn.Module]] | None = None
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """A module's persistent tensors (parameters and persistent buffers) and its non-persistent
    buffers, read from the module registries in the order the default state_dict lists them.
    A state_dict hook or an override cannot make these show tensors the model does not use;
    `strict` (what an identity needs) also refuses tensor subclasses, sparse and meta tensors.
    The fingerprint reads them unchecked: a tensor turned into one is a finding there. `walked`
    is walk_modules(module), for a caller that already has it."""
    check = plain_tensor if strict else (lambda _name, t: t)
    persistent: list[tuple[str, torch.Tensor]] = []
    optional: list[tuple[str, torch.Tensor]] = []
    for path, sub in walked if walked is not None else walk_modules(module):
        prefix = f"{path}." if path else ""
        for name, p in _registry(sub, "_parameters").items():
            if p is not None:
                persistent.append((prefix + name, check(prefix + name, p)))
        hidden = vars(sub).get("_non_persistent_buffers_set", set())
        for name, b in _registry(sub, "_buffers").items():
            if b is not None:
                (optional if name in hidden else persistent).append((prefix + name, check(prefix + name, b)))
    return persistent, optional


def live_sources(module: torch.nn.Module, stream: bool | None = None) -> list[TensorSource]:
    """Sources for a module's persistent tensors, with aliases collapsed.

    Names that share memory (tied weights such as GPT-2's lm_head and wte) are hashed once,
    under the first name in state_dict order, which is the name checkpoint writers keep.
    """
    return tensor_sources(module_tensors(module)[0], stream)[0]


def torch_uint8() -> torch.dtype:
    import torch

    return torch.uint8


def identity_of_module(
    module: torch.nn.Module, algorithm: str = "sha256", stream: bool | None = None
) -> TensorManifest:
    return hash_tensors(live_sources(module, stream), algorithm)
