"""IA3-style output scaling: y * scale, with one scale per output feature."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from revreg.artifacts.artifact import Attachment
from revreg.errors import InputError


def ia3_hook(module: nn.Module, att: Attachment, tensors: dict[str, torch.Tensor]) -> Callable[..., object]:
    from revreg.verifier.kinds import check_width, first_output

    scale = tensors["scale"]
    check_width(module, int(scale.shape[0]), "ia3", att.target)

    def change(y: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] != scale.shape[0]:
            raise InputError(f"ia3 on {att.target}: {scale.shape[0]} scales for {y.shape[-1]} output features")
        return (y * scale).to(y.dtype)

    def hook(mod: nn.Module, args: tuple[object, ...], output: object) -> object:
        return first_output(output, change, att.target)

    return hook
