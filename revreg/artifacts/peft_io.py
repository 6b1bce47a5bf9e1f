"""Conversion between PEFT LoRA adapter directories and revreg artifact tensors.

A PEFT directory holds adapter_config.json and adapter_model.safetensors. Only what revreg can
attach and remove by hooks is accepted; anything that would overwrite base weights is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from revreg.artifacts.artifact import KIND_ROLES, Attachment, BehaviorManifest
from revreg.artifacts.canonical import strict_loads
from revreg.artifacts.safetensors_io import MappedFile, MappedTensor, TensorData, write_safetensors
from revreg.errors import FormatError, InputError

PREFIX = "base_model.model."
# PEFT key suffix -> (layer, role)
SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
# Config options that change what the adapter does beyond y += s * B(A(x)).
_REFUSED = {
    "use_dora": "DoRA (use_dora) rescales base weights",
    "modules_to_save": "modules_to_save replaces whole base modules",
    "lora_bias": "lora_bias adds a trained bias",
    "target_parameters": "target_parameters adapts raw parameters, not modules",
    "layer_replication": "layer_replication changes the module tree",
    "trainable_token_indices": "trainable_token_indices rewrites embedding rows",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) gates on the input",
    "use_qalora": "QA-LoRA (use_qalora) pools inputs before the adapter",
    "use_bdlora": "use_bdlora changes the adapter's structure",
    "arrow_config": "arrow_config routes between adapters",
}


@dataclass(frozen=True)
class Imported:
    tensors: dict[str, tuple[str, tuple[int, ...], TensorData]]  # left in the mapped weights file
    attachments: tuple[Attachment, ...]
    provenance: dict[str, Any]

    def close(self) -> None:
        """Release the input files the tensors are read from (after packing)."""
        files = {id(d.file): d.file for _, _, d in self.tensors.values() if isinstance(d, MappedTensor)}
        for file in files.values():
            file.close()


# A pattern is matched against a module path with a time bound, so a hostile key such as
# `(a|aa)+` cannot stall a push (Python's re has no timeout; the regex package does).
PATTERN_TIMEOUT = 0.05
MAX_PATTERN = 512


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        raise InputError(f"PEFT {what} must be a finite number, got {value!r}")
    return float(value)


_ESCAPABLE = set(".dDwWsS\\-[]()|*+?^$")


def _check_pattern(key: str, what: str) -> None:
    """Patterns are PEFT's, which Python's `re` evaluates; they are matched here with the regex
    package (for its time bound), so only syntax both read the same way is accepted: no `{…}`
    (fuzzy matching and counted repeats differ), no `(?…)` groups, only plain escapes."""
    if len(key) > MAX_PATTERN:
        raise InputError(f"PEFT {what} key is over {MAX_PATTERN} characters")
    chars = iter(key)
    for ch in chars:
        if ch == "\\":
            if next(chars, "") not in _ESCAPABLE:
                raise InputError(f"PEFT {what} key {key[:60]!r} uses an escape revreg does not evaluate")
        elif ch == "{" or ch == "}" or not (ch.isascii() and (ch.isalnum() or ch in "_.-|()*+?^$[]")):
            raise InputError(f"PEFT {what} key {key[:60]!r} uses regular-expression syntax revreg does not evaluate")
    if "(?" in key:
        raise InputError(f"PEFT {what} key {key[:60]!r} uses a (?...) group revreg does not evaluate")
    try:
        re.compile(key)
    except re.error as exc:
        raise InputError(f"PEFT {what} key {key[:60]!r} is not a valid regular expression ({exc})") from exc


def _pattern_value(patterns: Any, target: str, default: Any, what: str) -> Any:
    """PEFT's rule: the first pattern key that matches the end of the module path gives the value."""
    if not isinstance(patterns, dict):
        raise InputError(f"PEFT {what} must be an object of pattern -> number, got {type(patterns).__name__}")
    for key, value in patterns.items():
        _check_pattern(key, what)
        try:
            hit = regex.match(rf"(.*\.)?({key})$", target, timeout=PATTERN_TIMEOUT)
        except regex.error as exc:
            raise InputError(f"PEFT {what} key {key[:60]!r} is not a valid regular expression ({exc})") from exc
        except TimeoutError as exc:
            raise InputError(f"PEFT {what} key {key[:60]!r} takes too long to match; simplify it") from exc
        if hit:
            return _number(value, f"{what}[{key[:60]!r}]")
    return default


def _targets_match(target_modules: Any, target: str) -> bool:
    """Whether PEFT's target_modules (a list of names or a regex string) selects `target`."""
    if isinstance(target_modules, str):
        _check_pattern(target_modules, "target_modules")
        try:
            return regex.fullmatch(target_modules, target, timeout=PATTERN_TIMEOUT) is not None
        except (regex.error, TimeoutError) as exc:
            raise InputError(f"PEFT target_modules {target_modules[:60]!r} is not a usable pattern ({exc})") from exc
    if isinstance(target_modules, list):
        return any(isinstance(m, str) and (target == m or target.endswith("." + m)) for m in target_modules)
    return False


def contradictions(config: Any, attachments: Sequence[Attachment]) -> list[str]:
    """How a PEFT adapter_config (kept in provenance) disagrees with the signed attachments:
    rank, alpha, rsLoRA and targets, per attachment. Empty when it describes them exactly."""
    loras = [a for a in attachments if a.kind == "lora"]
    if not isinstance(config, dict):
        return ["provenance.peft_config is not an object"]
    if not loras:
        return ["provenance.peft_config on an artifact without lora attachments"]
    try:
        r, alpha = _number(config.get("r"), "r"), _number(config.get("lora_alpha"), "lora_alpha")
        out = []
        for a in loras:
            rank = _pattern_value(config.get("rank_pattern") or {}, a.target, r, "rank_pattern")
            scale = _pattern_value(config.get("alpha_pattern") or {}, a.target, alpha, "alpha_pattern")
            if rank != a.rank:
                out.append(f"{a.target}: rank {rank:g} in the PEFT config, {a.rank} signed")
            if scale != a.alpha:
                out.append(f"{a.target}: lora_alpha {scale:g} in the PEFT config, {a.alpha:g} signed")
            if bool(config.get("use_rslora", False)) != a.rslora:
                out.append(f"{a.target}: use_rslora {config.get('use_rslora')} in the PEFT config, {a.rslora} signed")
            if "target_modules" in config and not _targets_match(config["target_modules"], a.target):
                out.append(f"{a.target}: not among the PEFT config's target_modules")
    except InputError as exc:
        return [str(exc)]
    return out


def check_provenance(attachments: Sequence[Attachment], provenance: Any) -> None:
    """Refuse a provenance whose PEFT config contradicts what the artifact signs (at pack, push, pull)."""
    if isinstance(provenance, dict) and "peft_config" in provenance:
        wrong = contradictions(provenance["peft_config"], attachments)
        if wrong:
            raise InputError(f"provenance.peft_config contradicts the signed attachments: {'; '.join(wrong[:3])}")


def read_peft(directory: Path) -> Imported:
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    weights_path = directory / "adapter_model.safetensors"
    if not config_path.is_file():
        raise InputError(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin is not supported: save with safe_serialization=True)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise InputError(f"{directory} has no adapter_model.safetensors{hint}")
    config = strict_loads(config_path.read_bytes(), str(config_path))
    if not isinstance(config, dict):
        raise FormatError(f"{config_path} is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"unsupported PEFT adapter type {peft_type!r}: revreg imports LORA adapters")
    for option, why in _REFUSED.items():
        if config.get(option):
            raise InputError(f"unsupported PEFT option {option}: {why}, which cannot be undone by unloading")
    if config.get("bias", "none") != "none":
        raise InputError(f"unsupported PEFT option bias={config['bias']!r}: trained biases overwrite base weights")
    try:
        r, alpha = int(_number(config.get("r"), "r")), _number(config.get("lora_alpha"), "lora_alpha")
    except (InputError, OverflowError, ValueError) as exc:
        raise FormatError(f"{config_path}: r and lora_alpha must be finite numbers") from exc
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    parts: dict[str, dict[str, Any]] = {}
    tensors: dict[str, tuple[str, tuple[int, ...], TensorData]] = {}
    # The file stays mapped (each tensor is read a block at a time when packed), not copied.
    mapped = MappedFile(weights_path)
    for info in mapped.header.tensors:
        match = next(((s, v) for s, v in SUFFIXES.items() if info.name.endswith(s)), None)
        if not info.name.startswith(PREFIX) or match is None:
            raise InputError(f"unsupported tensor {info.name!r} in {weights_path}: expected LoRA A/B weights")
        suffix, (layer, role) = match
        target = info.name[len(PREFIX) : -len(suffix)]
        entry = parts.setdefault(target, {"layer": layer})
        if entry["layer"] != layer or role in entry:
            raise FormatError(f"{weights_path}: conflicting LoRA tensors for {target}")
        entry[role] = f"{target}.{KIND_ROLES['lora'][role]}"
        tensors[entry[role]] = (info.dtype, info.shape, MappedTensor(mapped, info))
    attachments = []
    for target, entry in sorted(parts.items()):
        if "A" not in entry or "B" not in entry:
            raise FormatError(f"{weights_path}: {target} has only one of lora_A / lora_B")
        rank = tensors[entry["A"]][1][0] if tensors[entry["A"]][1] else 0
        expected_rank = int(_pattern_value(rank_pattern, target, r, "rank_pattern"))
        if rank != expected_rank:
            raise FormatError(f"{weights_path}: {target} has rank {rank}, config says {expected_rank}")
        attachments.append(
            Attachment(
                target=target,
                kind="lora",
                layer=entry["layer"],
                rank=rank,
                alpha=float(_pattern_value(alpha_pattern, target, alpha, "alpha_pattern")),
                rslora=rslora,
                tensors={"A": entry["A"], "B": entry["B"]},
            )
        )
    if not attachments:
        raise InputError(f"{weights_path} holds no LoRA tensors")
    return Imported(tensors, tuple(attachments), {"source": "peft", "peft_config": config})


def peft_config_for(manifest: BehaviorManifest) -> dict[str, Any]:
    """The adapter_config.json for an artifact, from what is signed: the imported config when it
    describes the signed attachments exactly (so pack -> export -> pack gives the same bytes),
    otherwise one built from the attachments. Never numbers that contradict the signature."""
    stored = manifest.provenance.get("peft_config")
    if isinstance(stored, dict) and not contradictions(stored, manifest.attachments):
        return stored
    loras = [a for a in manifest.attachments if a.kind == "lora"]
    first = loras[0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "use_rslora": first.rslora,
        "target_modules": sorted(a.target for a in loras),
        "rank_pattern": {re.escape(a.target): a.rank for a in loras},
        "alpha_pattern": {re.escape(a.target): a.alpha for a in loras},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "revision": None,
        "base_model_name_or_path": None,
        "init_lora_weights": True,
    }


def write_peft(
    manifest: BehaviorManifest,
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
    out: Path,
) -> None:
    """Write a PEFT adapter directory; `out` appears complete or not at all."""
    others = sorted({a.kind for a in manifest.attachments if a.kind != "lora"})
    if others:
        raise InputError(f"cannot export to PEFT: it has no equivalent of revreg kind {others[0]!r}")
    if len({a.rslora for a in manifest.attachments}) > 1:
        raise InputError("cannot export to PEFT: attachments mix rslora and plain scaling")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not an empty directory")
    peft_tensors = {}
    for a in manifest.attachments:
        for role, name in a.tensors.items():
            key = (
                f"{PREFIX}{a.target}.lora_{role}.weight"
                if a.layer == "linear"
                else f"{PREFIX}{a.target}.lora_embedding_{role}"
            )
            peft_tensors[key] = tensors[name]
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        write_safetensors(staging / "adapter_model.safetensors", peft_tensors, {"format": "pt"})
        (staging / "adapter_config.json").write_text(
            json.dumps(peft_config_for(manifest), indent=2, sort_keys=True) + "\n"
        )
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
