"""Builds the tensors described in tests/data/identity_vectors.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from revreg.artifacts.identity import BufferSource

VECTORS = Path(__file__).parent / "data" / "identity_vectors.json"


def tensor_bytes(spec: dict[str, Any]) -> bytes:
    fill = spec["fill"]
    if "hex" in fill:
        return bytes.fromhex(fill["hex"])
    i = np.arange(fill["length"], dtype=np.uint64)
    return ((i * fill["mul"] + fill["add"]) % 256).astype(np.uint8).tobytes()


def sources(vector: dict[str, Any]) -> list[BufferSource]:
    return [
        BufferSource(t["name"], t["dtype"], tuple(t["shape"]), memoryview(tensor_bytes(t))) for t in vector["tensors"]
    ]


def load() -> list[dict[str, Any]]:
    return json.loads(VECTORS.read_text())["vectors"]
