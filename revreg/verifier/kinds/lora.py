"""LoRA: y + scaling * B(A(x)) on Linear / GPT-2 Conv1D, y + scaling * A^T[ids] B^T on Embedding.

The arithmetic follows PEFT's forward step for step, so outputs match PEFT's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from revreg.artifacts.artifact import Attachment
from revreg.errors import InputError


def lora_hook(module: nn.Module, att: Attachment, tensors: dict[str, torch.Tensor]) -> Callable[..., object]:
    from revreg.verifier.kinds import check_width, first_output

    a, b = tensors["A"], tensors["B"]
    scaling = float(att.scaling or 0.0)
    if att.layer == "embedding":
        if not isinstance(module, nn.Embedding):
            raise InputError(f"lora embedding on {att.target}: the module is a {type(module).__name__}")
        if a.shape[1] != module.num_embeddings or b.shape[0] != module.embedding_dim:
            raise InputError(
                f"lora on {att.target}: shapes {list(a.shape)}/{list(b.shape)} do not fit "
                f"Embedding({module.num_embeddings}, {module.embedding_dim})"
            )
        emb_a, emb_b = a.T, b.T

        def embedding_hook(mod: nn.Module, args: tuple[object, ...], output: object) -> object:
            ids = args[0]
            assert isinstance(ids, torch.Tensor) and isinstance(mod, nn.Embedding)

            def change(y: torch.Tensor) -> torch.Tensor:
                after_a = F.embedding(
                    ids,
                    emb_a,
                    padding_idx=mod.padding_idx,
                    max_norm=mod.max_norm,
                    norm_type=mod.norm_type,
                    scale_grad_by_freq=mod.scale_grad_by_freq,
                    sparse=mod.sparse,
                )
                return (y + (after_a @ emb_b) * scaling).to(y.dtype)

            return first_output(output, change, att.target)

        return embedding_hook

    in_features = _in_features(module, att.target)
    if a.shape[1] != in_features:
        raise InputError(f"lora on {att.target}: A expects {a.shape[1]} inputs, the module takes {in_features}")
    if b.shape[1] != a.shape[0]:
        raise InputError(f"lora on {att.target}: A has rank {a.shape[0]}, B has {b.shape[1]} columns")
    check_width(module, int(b.shape[0]), "lora B", att.target)

    def linear_hook(mod: nn.Module, args: tuple[object, ...], output: object) -> object:
        x = args[0]
        assert isinstance(x, torch.Tensor)

        def change(y: torch.Tensor) -> torch.Tensor:
            h = F.linear(F.linear(x.to(a.dtype), a), b)
            return (y + h * scaling).to(y.dtype)

        return first_output(output, change, att.target)

    return linear_hook


def _in_features(module: nn.Module, target: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    # transformers' Conv1D (GPT-2) stores weight as [in, out]; identified by duck typing so
    # revreg does not need transformers to attach.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])
    raise InputError(f"lora (linear) on {target}: the module is a {type(module).__name__}, not Linear or Conv1D")
