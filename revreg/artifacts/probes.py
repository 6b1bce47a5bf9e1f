"""Probe sets: content-addressed safetensors files of model inputs plus a manifest saying how
to call the model with them, which output to compare, and how to measure divergence."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revreg.artifacts.artifact import file_digest
from revreg.artifacts.canonical import canonical_json, strict_loads
from revreg.artifacts.safetensors_io import SMALL_HEADER_BYTES, canonical_header, read_header, write_safetensors
from revreg.errors import FormatError, InputError

SCHEMA = "revreg.probes/v1"
MANIFEST_KEY = "revreg.probes"
OUTPUTS = ("logits", "last_hidden_state", "output")
DIVERGENCES = ("kl", "mse")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
INPUT_DTYPES = {"I64", "I32", "F32", "F16", "BF16", "F64", "BOOL", "U8"}


@dataclass(frozen=True)
class ProbeManifest:
    name: str
    inputs: tuple[str, ...]  # tensor names, passed to the model as keyword arguments
    output: str  # which output to compare: logits, last_hidden_state, or the output itself
    divergence: str  # kl (softmax over the last dimension) or mse
    mask: str | None  # an input whose zeros mark positions to ignore (attention_mask)
    batch_size: int
    count: int
    prompts: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "inputs": list(self.inputs),
            "output": self.output,
            "divergence": self.divergence,
            "mask": self.mask,
            "batch_size": self.batch_size,
            "count": self.count,
            "prompts": list(self.prompts),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> ProbeManifest:
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise FormatError(f"probe set manifest is not a {SCHEMA} document")
        try:
            for key, kind in (("name", str), ("output", str), ("divergence", str), ("batch_size", int), ("count", int)):
                if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
                    raise TypeError(f"{key} must be {'a string' if kind is str else 'an integer'}, got {doc[key]!r}")
            if doc["mask"] is not None and not isinstance(doc["mask"], str):
                raise TypeError("mask must be a string or null")
            if not all(isinstance(x, str) for x in doc["inputs"]) or not all(
                isinstance(x, str) for x in doc["prompts"]
            ):
                raise TypeError("inputs and prompts must be lists of strings")
            m = cls(
                doc["name"],
                tuple(doc["inputs"]),
                doc["output"],
                doc["divergence"],
                doc["mask"],
                doc["batch_size"],
                doc["count"],
                tuple(doc["prompts"]),
                dict(doc["source"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise FormatError(f"malformed probe set manifest ({exc})") from exc
        m.check()
        return m

    def check(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise InputError(f"invalid probe set name {self.name!r}: lowercase letters, digits, '.', '_', '-'")
        if self.output not in OUTPUTS:
            raise InputError(f"probe output must be one of {', '.join(OUTPUTS)}, not {self.output!r}")
        if self.divergence not in DIVERGENCES:
            raise InputError(f"divergence must be one of {', '.join(DIVERGENCES)}, not {self.divergence!r}")
        if self.batch_size < 1 or self.count < 1:
            raise InputError("a probe set needs at least one probe and a batch size of at least 1")
        if self.mask is not None and self.mask not in self.inputs:
            raise InputError(f"mask {self.mask!r} is not one of the inputs")


@dataclass(frozen=True)
class ProbeFile:
    path: Path
    manifest: ProbeManifest
    digest: str  # sha256 of the file: what certifications name


def write_probes(out: Path, tensors: Mapping[str, tuple[str, tuple[int, ...], bytes]], manifest: ProbeManifest) -> None:
    manifest.check()
    _check_tensors(manifest, {n: (d, s) for n, (d, s, _) in tensors.items()})
    write_safetensors(out, dict(tensors), {MANIFEST_KEY: canonical_json(manifest.to_dict()).decode("utf-8")})


def _check_tensors(manifest: ProbeManifest, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    if set(shapes) != set(manifest.inputs):
        raise InputError(f"probe tensors {sorted(shapes)} differ from the manifest's inputs {list(manifest.inputs)}")
    for name, (dtype, shape) in shapes.items():
        if dtype not in INPUT_DTYPES or not shape:
            raise InputError(f"probe input {name!r} must be a tensor with a batch dimension ({dtype} {list(shape)})")
        if shape[0] != manifest.count:
            raise InputError(f"probe input {name!r} has {shape[0]} rows, the manifest says {manifest.count}")


def read_probes(path: Path) -> ProbeFile:
    path = Path(path)
    header = read_header(path, SMALL_HEADER_BYTES)
    if canonical_header(header) != header.raw or set(header.metadata) != {MANIFEST_KEY}:
        raise FormatError(f"{path} is not a revreg probe set (create one with `revreg probes create`)")
    manifest = ProbeManifest.from_dict(strict_loads(header.metadata[MANIFEST_KEY], f"{path}: probe manifest"))
    try:
        _check_tensors(manifest, {t.name: (t.dtype, t.shape) for t in header.tensors})
    except InputError as exc:
        raise FormatError(f"{path}: {exc}") from exc
    return ProbeFile(path, manifest, file_digest(path))


# transformers' auto mappings whose classes return `logits`: a distribution over a vocabulary
# or labels, compared by KL/JS.
_LOGIT_MAPPINGS = (
    "CAUSAL_LM",
    "MASKED_LM",
    "SEQ_TO_SEQ_CAUSAL_LM",
    "SPEECH_SEQ_2_SEQ",
    "CTC",
    "SEQUENCE_CLASSIFICATION",
    "TOKEN_CLASSIFICATION",
    "MULTIPLE_CHOICE",
    "NEXT_SENTENCE_PREDICTION",
    "IMAGE_CLASSIFICATION",
    "AUDIO_CLASSIFICATION",
    "VIDEO_CLASSIFICATION",
)


def _classes(mapping: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, tuple | list) else (value,))
    return names


def divergence_for(output: str) -> str:
    """The default divergence for an output: MSE for hidden states, KL for distributions."""
    return "mse" if output == "last_hidden_state" else "kl"


def output_for(model_dir: Path) -> str:
    """The output to compare, from `model_dir`/config.json as the verifier loads the model (the
    class named in `architectures`, else transformers' AutoModel for `model_type`): logits for a
    class in one of transformers' LM, seq2seq or classification mappings, last_hidden_state for
    a bare model of AutoModel's mapping. Anything else (a composite config such as CLIP's, a class
    in no mapping) is an InputError that names the flags."""
    hint = (
        "pass --output logits (language models, classifiers) or --output last_hidden_state --divergence mse "
        "(encoders, embedding models)"
    )
    config = Path(model_dir) / "config.json"
    try:
        doc = strict_loads(config.read_bytes(), str(config))
    except (OSError, FormatError) as exc:
        raise InputError(f"cannot tell which output of {model_dir} to compare (no readable config.json): {hint}") from (
            exc
        )
    if not isinstance(doc, dict):
        raise InputError(f"cannot tell which output of {model_dir} to compare (config.json is not an object): {hint}")
    from transformers.models.auto import modeling_auto as auto

    architectures = doc.get("architectures")
    names = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    bare = _classes(auto.MODEL_MAPPING_NAMES)
    if not names and isinstance(doc.get("model_type"), str):
        found: Any = auto.MODEL_MAPPING_NAMES.get(doc["model_type"])
        names = [str(n) for n in found] if isinstance(found, tuple | list) else [str(found)] if found else []
    composite = any(k.endswith("_config") and isinstance(v, dict) for k, v in doc.items())
    if len(names) == 1 and not composite:
        if any(names[0] in _classes(getattr(auto, f"MODEL_FOR_{m}_MAPPING_NAMES", {})) for m in _LOGIT_MAPPINGS):
            return "logits"
        if names[0] in bare:
            return "last_hidden_state"
    shown = ", ".join(names) or "none"
    raise InputError(f"cannot tell which output of {model_dir} to compare (architectures: {shown}): {hint}")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def from_prompts(
    prompts: list[str],
    tokenizer_dir: Path,
    name: str,
    max_length: int,
    batch_size: int,
    output: str = "logits",
    divergence: str = "kl",
) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], ProbeManifest]:
    """Tokenize prompts with a local tokenizer (never downloaded), right-padded to one length."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise InputError("creating probes from prompts needs transformers: pip install 'revreg[hf]'") from exc
    import numpy as np

    if not prompts:
        raise InputError("no prompts: the file has no non-empty lines")
    # The tokenizer files are the user's input, parsed by transformers: whatever it raises on
    # them is bad input, said in one line.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:
        raise InputError(f"cannot load a tokenizer from {tokenizer_dir}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise InputError(f"the tokenizer in {tokenizer_dir} has no pad, eos or unk token to pad prompts with")
    try:
        encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    except Exception as exc:
        raise InputError(f"the tokenizer in {tokenizer_dir} cannot encode the prompts: {_first_line(exc)}") from exc
    tensors = {
        k: ("I64", tuple(v.shape), np.ascontiguousarray(v, dtype="<i8").tobytes())
        for k, v in encoded.items()
        if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    manifest = ProbeManifest(
        name,
        tuple(sorted(tensors)),
        output,
        divergence,
        "attention_mask",
        batch_size,
        len(prompts),
        tuple(prompts),
        {"tokenizer": Path(tokenizer_dir).name, "max_length": max_length},
    )
    return tensors, manifest


def from_tensors(
    path: Path, name: str, batch_size: int, output: str = "output", divergence: str = "kl", mask: str | None = None
) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], ProbeManifest]:
    """Raw input tensors from a safetensors file; each becomes a keyword argument of the model."""
    from revreg.artifacts.artifact import read_tensors

    tensors = read_tensors(Path(path))
    if not tensors:
        raise InputError(f"{path} holds no tensors")
    counts = {shape[0] if shape else 0 for _, shape, _ in tensors.values()}
    if len(counts) != 1:
        raise InputError(f"{path}: every input needs the same number of rows (first dimension)")
    manifest = ProbeManifest(
        name,
        tuple(sorted(tensors)),
        output,
        divergence,
        mask,
        batch_size,
        counts.pop(),
        (),
        {"tensors": Path(path).name},
    )
    return tensors, manifest
