"""Loading base models for verification: a Hugging Face directory (offline, transformers) or a
Python factory `package.module:function` plus a safetensors weights file."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from revreg.artifacts.canonical import strict_loads
from revreg.artifacts.identity import TensorManifest
from revreg.artifacts.sources import identity_of_path
from revreg.errors import BaseMismatch, InputError


def load_hf(directory: Path) -> nn.Module:
    """The architecture named in config.json, from local files only."""
    try:
        import transformers
    except ImportError as exc:
        raise InputError("loading a Hugging Face model directory needs transformers: pip install 'revreg[hf]'") from exc
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise InputError(f"{directory} has no config.json: pass a weights file with --factory instead")
    doc = strict_loads(config_path.read_bytes(), str(config_path))
    architectures = doc.get("architectures") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or (architectures is not None and not isinstance(architectures, list)):
        raise InputError(f"{config_path} is not a transformers config (an object, with a list of architectures)")
    named = architectures[0] if architectures else None
    cls = getattr(transformers, named, None) if isinstance(named, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        if architectures:
            raise InputError(f"{config_path}: architectures[0] {named!r} is not a transformers model class")
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        # A config that does not fit the weights (shapes, a missing key) is bad input: say which.
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise InputError(f"cannot load {directory} with transformers ({cls.__name__}): {reason}") from exc
    return model.eval()


def load_factory(spec: str, weights: Path) -> nn.Module:
    """Build a model with `module:function`, then load `weights` into it."""
    from safetensors.torch import load_file

    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise InputError(f"--factory {spec!r} must look like package.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot import factory {spec}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"factory {spec} returned a {type(model).__name__}, not a torch module")
    state = load_file(str(weights))
    with torch.no_grad():
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise InputError(f"{weights} has tensors the model built by {spec} lacks: {', '.join(unexpected[:5])}")
    # Whether the model holds exactly these weights is checked by the protocol against the
    # file's manifest (protocol.check_base), for factories and Hugging Face models alike.
    return model.eval()


def load_base(
    base: Path,
    factory: str | None = None,
    device: str = "cpu",
    expected: str | None = None,
    label: str = "the behavior",
) -> tuple[nn.Module, TensorManifest]:
    """The model, and the manifest of the weights it was loaded from (what identity is about).

    The files are hashed first: with `expected` (the behavior's base identity), a base that is
    not the behavior's is refused in the time hashing takes, before any model is built."""
    base = Path(base)
    if not base.exists():
        raise InputError(f"base model {base} does not exist")
    weights = identity_of_path(base, expected.split(":", 1)[0] if expected else "sha256")
    if expected is not None and weights.identity != expected:
        raise BaseMismatch(
            f"{label} is bound to base {expected}, but {base} is {weights.identity}; "
            "refusing to run (nothing was loaded)"
        )
    model = load_factory(factory, base) if factory else load_hf(base)
    return model.to(device), weights
