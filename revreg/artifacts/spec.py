"""Native behavior specs: a tensors file plus a small JSON file saying where each tensor goes.

{"attachments": [{"target": "h.0.mlp", "kind": "steer", "tensors": {"vector": "v0"}},
                 {"target": "h.0.attn.c_attn", "kind": "lora", "layer": "linear",
                  "alpha": 16, "tensors": {"A": "a0", "B": "b0"}}],
 "description": "...", "license": "...", "provenance": {...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from revreg.artifacts.artifact import KIND_ROLES, Attachment
from revreg.artifacts.canonical import strict_loads
from revreg.artifacts.peft_io import Imported
from revreg.artifacts.safetensors_io import MappedFile, MappedTensor, TensorData
from revreg.errors import InputError

_FIELDS = {"target", "kind", "tensors", "layer", "alpha", "rslora"}


def read_spec(tensors_path: Path, spec_path: Path) -> tuple[Imported, dict[str, Any]]:
    """Tensors renamed to revreg's convention, attachments, and the spec's descriptive fields."""
    spec = strict_loads(Path(spec_path).read_bytes(), str(spec_path))
    if not isinstance(spec, dict) or not isinstance(spec.get("attachments"), list):
        raise InputError(f"{spec_path}: expected an object with an 'attachments' list")
    unknown = set(spec) - {"attachments", "description", "license", "provenance"}
    if unknown:
        raise InputError(f"{spec_path}: unknown field {sorted(unknown)[0]!r}")
    # Tensors stay in the mapped file until packing writes them a block at a time.
    mapped = MappedFile(Path(tensors_path))
    source: dict[str, tuple[str, tuple[int, ...], TensorData]] = {
        t.name: (t.dtype, t.shape, MappedTensor(mapped, t)) for t in mapped.header.tensors
    }
    tensors: dict[str, tuple[str, tuple[int, ...], TensorData]] = {}
    attachments = []
    for i, entry in enumerate(spec["attachments"]):
        where = f"{spec_path}: attachment {i}"
        if not isinstance(entry, dict) or set(entry) - _FIELDS:
            raise InputError(f"{where}: fields must be among {sorted(_FIELDS)}")
        kind, target, given = entry.get("kind"), entry.get("target"), entry.get("tensors")
        if kind not in KIND_ROLES:
            raise InputError(f"{where}: unknown kind {kind!r} (supported: {', '.join(KIND_ROLES)})")
        if not isinstance(given, dict) or set(given) != set(KIND_ROLES[kind]):
            raise InputError(f"{where}: {kind} needs tensors {sorted(KIND_ROLES[kind])}")
        renamed = {}
        for role, name in given.items():
            if name not in source:
                raise InputError(f"{where}: tensor {name!r} is not in {tensors_path}")
            renamed[role] = f"{target}.{KIND_ROLES[kind][role]}"
            tensors[renamed[role]] = source[name]
        rank = source[given["A"]][1][0] if kind == "lora" and source[given["A"]][1] else None
        attachments.append(
            Attachment(
                target=str(target),
                kind=kind,
                tensors=renamed,
                layer=entry.get("layer", "linear") if kind == "lora" else None,
                rank=rank,
                alpha=entry.get("alpha", rank) if kind == "lora" else None,
                rslora=bool(entry.get("rslora", False)),
            )
        )
    extra = {k: spec[k] for k in ("description", "license") if k in spec}
    if not all(isinstance(v, str) for v in extra.values()):
        raise InputError(f"{spec_path}: description and license must be strings")
    provenance = spec.get("provenance", {})
    if not isinstance(provenance, dict):
        raise InputError(f"{spec_path}: provenance must be an object")
    return Imported(tensors, tuple(attachments), {"source": "spec", **provenance}), extra
