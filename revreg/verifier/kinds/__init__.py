"""Attachment kinds: how each kind of behavior changes a module's output through a forward
hook. Each kind takes the behavior's own tensors and never touches the module's parameters."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from revreg.artifacts.artifact import Attachment
from revreg.errors import InputError
from revreg.verifier.kinds.ia3 import ia3_hook
from revreg.verifier.kinds.lora import lora_hook
from revreg.verifier.kinds.steer import steer_hook

HookFactory = Callable[[nn.Module, Attachment, dict[str, torch.Tensor]], Callable[..., object]]

KINDS: dict[str, HookFactory] = {"lora": lora_hook, "ia3": ia3_hook, "steer": steer_hook}


def output_width(module: nn.Module) -> int | None:
    """The size of the last dimension of a module's output where its type says it (Linear,
    GPT-2's Conv1D, Embedding, LayerNorm over one dimension), else None (checked at the first
    forward instead)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return int(module.normalized_shape[0])
    nf = getattr(module, "nf", None)
    if type(module).__name__ == "Conv1D" and isinstance(nf, int):
        return nf
    return None


def check_width(module: nn.Module, size: int, what: str, target: str) -> None:
    """Refuse at attach a per-feature tensor that does not fit the module's output."""
    width = output_width(module)
    if width is not None and size != width:
        raise InputError(f"{what} on {target}: {size} values for a module with {width} output features")


def first_output(output: object, change: Callable[[torch.Tensor], torch.Tensor], target: str = "") -> object:
    """Apply `change` to a module's output: a tensor, the first element of a tuple, or the first
    field of a transformers ModelOutput (a new one: the module's own output is never written)."""
    if isinstance(output, torch.Tensor):
        return change(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (change(output[0]), *output[1:])
    if isinstance(output, Mapping) and hasattr(output, "to_tuple") and output:
        key = next(iter(output))
        if isinstance(output[key], torch.Tensor):
            changed: Any = copy.copy(output)
            changed[key] = change(output[key])  # ModelOutput sets the field and the key together
            return changed
    raise InputError(
        f"cannot attach to {target or 'this module'}: its output is a {type(output).__name__}, "
        "not a tensor, a tuple starting with one, or a ModelOutput whose first field is one"
    )
