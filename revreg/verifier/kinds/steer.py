"""Steering vector: y + vector, added to a module's output (or the first element of it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from revreg.artifacts.artifact import Attachment
from revreg.errors import InputError


def steer_hook(module: nn.Module, att: Attachment, tensors: dict[str, torch.Tensor]) -> Callable[..., object]:
    from revreg.verifier.kinds import check_width, first_output

    vector = tensors["vector"]
    check_width(module, int(vector.shape[0]), "steer", att.target)

    def change(y: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] != vector.shape[0]:
            raise InputError(f"steer on {att.target}: a vector of {vector.shape[0]} for {y.shape[-1]} output features")
        return (y + vector).to(y.dtype)

    def hook(mod: nn.Module, args: tuple[object, ...], output: object) -> object:
        return first_output(output, change, att.target)

    return hook
