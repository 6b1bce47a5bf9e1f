"""Small real models, behaviors and probe sets for verifier tests (built here, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from revreg.artifacts.artifact import Attachment, pack
from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import ProbeManifest, write_probes
from revreg.artifacts.sources import identity_of_module
from revreg.verifier.engine import Behavior, load_behavior
from revreg.verifier.runner import Probes, load_probes
from tests.conftest import CREATED


class SmallCNN(nn.Module):
    """Conv + BatchNorm + a non-persistent buffer, to exercise buffer fingerprints."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 10)
        self.register_buffer("scale", torch.tensor(1.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1)) * self.scale


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.9, 1.1)
    return model.eval()


def _bytes(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return "F32", tuple(t.shape), t.detach().contiguous().numpy().tobytes()


def make_behavior(
    tmp: Path,
    keys_dir: Path,
    model: nn.Module,
    specs: list[tuple[str, str, dict[str, torch.Tensor]]],
    *,
    base: str | None = None,
    layer: str = "linear",
    alpha: float = 2.0,
    name: str = "b",
) -> Behavior:
    """Pack `(target, kind, {role: tensor})` attachments for `model` and load them back verified."""
    from revreg.artifacts.artifact import KIND_ROLES

    tensors, attachments = {}, []
    for target, kind, roles in specs:
        names = {role: f"{target}.{KIND_ROLES[kind][role]}" for role in roles}
        tensors |= {names[role]: _bytes(t) for role, t in roles.items()}
        extra = {"layer": layer, "rank": roles["A"].shape[0], "alpha": alpha} if kind == "lora" else {}
        attachments.append(Attachment(target, kind, names, **extra))
    out = tmp / f"{name}.safetensors"
    pack(
        out,
        tensors,
        tuple(attachments),
        name=name,
        version="1",
        base=base or identity_of_module(model).identity,
        signer=Keyring(keys_dir).signer("alice"),
        created=CREATED,
    )
    return load_behavior(out, Keyring(keys_dir).trusted())


def make_probes(
    tmp: Path,
    inputs: dict[str, torch.Tensor],
    *,
    output: str = "output",
    divergence: str = "kl",
    mask: str | None = None,
    batch_size: int = 4,
    name: str = "p",
) -> Probes:
    first = next(iter(inputs.values()))
    dtypes = {torch.int64: "I64", torch.float32: "F32"}
    tensors = {k: (dtypes[v.dtype], tuple(v.shape), v.contiguous().numpy().tobytes()) for k, v in inputs.items()}
    manifest = ProbeManifest(name, tuple(sorted(inputs)), output, divergence, mask, batch_size, first.shape[0])
    write_probes(tmp / f"{name}.probes.safetensors", tensors, manifest)
    return load_probes(tmp / f"{name}.probes.safetensors")
