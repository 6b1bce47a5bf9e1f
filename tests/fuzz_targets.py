"""Parsers under attack: each target takes arbitrary bytes (or a value) and must end either in
success or in a RevregError. Shared by the test suite (fixed budget) and fuzz/run.py (long runs)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

from revreg.artifacts.artifact import BehaviorManifest, open_artifact, verify_artifact
from revreg.artifacts.attestation import verify_certification
from revreg.artifacts.dsse import Envelope
from revreg.artifacts.keys import Keyring
from revreg.artifacts.peft_io import read_peft
from revreg.artifacts.probes import read_probes
from revreg.artifacts.safetensors_io import parse_header
from revreg.gate.policy import parse_policy

GOLDEN = Path(__file__).parent / "data" / "golden"
_TMP = Path(tempfile.mkdtemp(prefix="revreg-fuzz-"))
_TRUSTED = Keyring(GOLDEN / "keys").trusted()


def safetensors_header(data: bytes) -> None:
    parse_header(data, len(data), "fuzz")


def artifact_file(data: bytes) -> None:
    path = _TMP / "a.safetensors"
    path.write_bytes(data)
    verify_artifact(open_artifact(path), _TRUSTED)


def manifest(data: bytes) -> None:
    BehaviorManifest.from_bytes(data)


def envelope(data: bytes) -> None:
    Envelope.from_json(data)


def attestation(data: bytes) -> None:
    verify_certification(data, _TRUSTED)


def tensor_manifest(data: bytes) -> None:
    from revreg.artifacts.canonical import strict_loads
    from revreg.artifacts.identity import TensorManifest

    assert TensorManifest.from_dict(strict_loads(data, "fuzz")).identity  # hashing must not crash either


def probe_manifest(data: bytes) -> None:
    from revreg.artifacts.canonical import strict_loads
    from revreg.artifacts.probes import ProbeManifest

    ProbeManifest.from_dict(strict_loads(data, "fuzz"))


def policy(text: str) -> None:
    parse_policy(text, "fuzz.toml")


def probe_file(data: bytes) -> None:
    path = _TMP / "p.safetensors"
    path.write_bytes(data)
    read_probes(path)


def peft_config(config: Any, weights: bytes) -> None:
    directory = _TMP / "peft"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    read_peft(directory)


def golden_bytes() -> bytes:
    return (GOLDEN / "golden-1.0.0.safetensors").read_bytes()


def golden_header_json() -> bytes:
    data = golden_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n]


def golden_probes() -> bytes:
    """A valid probe set file (built here, deterministic)."""
    from revreg.artifacts.probes import ProbeManifest, write_probes

    path = _TMP / "golden.probes"
    ids = b"".join(struct.pack("<q", i % 50) for i in range(4 * 6))
    write_probes(
        path, {"input_ids": ("I64", (4, 6), ids)}, ProbeManifest("fuzz", ("input_ids",), "logits", "kl", None, 2, 4)
    )
    return path.read_bytes()
