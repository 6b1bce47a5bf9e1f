"""Attachment kinds: how each kind of behavior changes a module's output through a forward
hook. Each kind takes the behavior's own tensors and never touches the module's parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from revreg.artifacts.artifact import Attachment
from revreg.verifier.kinds.ia3 import ia3_hook
from revreg.verifier.kinds.lora import lora_hook
from revreg.verifier.kinds.steer import steer_hook

HookFactory = Callable[[nn.Module, Attachment, dict[str, torch.Tensor]], Callable[..., object]]

KINDS: dict[str, HookFactory] = {"lora": lora_hook, "ia3": ia3_hook, "steer": steer_hook}


def first_output(output: object, change: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """Apply `change` to a module's output, or to the first element of a tuple output."""
    if isinstance(output, torch.Tensor):
        return change(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (change(output[0]), *output[1:])
    raise TypeError(f"cannot modify a module output of type {type(output).__name__}")
