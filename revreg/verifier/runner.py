"""Running a probe set through a model: same batches, same shapes, every time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revreg.artifacts.probes import ProbeFile, read_probes
from revreg.errors import InputError


@dataclass(frozen=True)
class Probes:
    file: ProbeFile
    batches: list[dict[str, torch.Tensor]]
    masks: list[torch.Tensor | None]

    @property
    def name(self) -> str:
        return self.file.manifest.name

    @property
    def digest(self) -> str:
        return self.file.digest


def load_probes(path: Path, device: str = "cpu") -> Probes:
    from safetensors.torch import load_file

    probe_file = read_probes(path)
    m = probe_file.manifest
    tensors = load_file(str(path), device=device)
    batches, masks = [], []
    for start in range(0, m.count, m.batch_size):
        batch = {name: tensors[name][start : start + m.batch_size] for name in m.inputs}
        batches.append(batch)
        masks.append(batch[m.mask] if m.mask else None)
    return Probes(probe_file, batches, masks)


def _select(result: Any, output: str) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if output != "output":
        value = getattr(result, output, None)
        if value is None and isinstance(result, dict):
            value = result.get(output)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(result, tuple | list) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    raise InputError(f"the model's output has no tensor {output!r} (got {type(result).__name__})")


@torch.inference_mode()
def run(model: nn.Module, probes: Probes) -> list[torch.Tensor]:
    """Outputs per batch, copied to the host so later runs cannot alias them."""
    output = probes.file.manifest.output
    return [_select(model(**batch), output).detach().to("cpu", copy=True) for batch in probes.batches]
