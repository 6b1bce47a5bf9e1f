"""`revreg pack` memory: peak RSS while packing a large adapter, against the artifact's size.

Writes a tensors file of steering vectors (64 MiB each, --gib in all) and a pack spec, then runs
`revreg pack --tensors … --spec …` under GNU time. Tensors are read from the mapped input a
block at a time and dropped after use, so peak RSS should not grow with the artifact.

    python benchmarks/bench_pack.py [--gib 1.5] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from measure import timed, workspace

REVREG = str(Path(sys.executable).parent / "revreg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    from revreg.artifacts.safetensors_io import write_safetensors

    out, _keys, env = workspace(args.out)
    per = 16 << 20  # floats per tensor: 64 MiB
    count = max(1, round(args.gib * 16))
    block = np.random.default_rng(0).standard_normal(per).astype("<f4").tobytes()
    tensors_path = out / "pack-input.safetensors"
    write_safetensors(tensors_path, {f"v{i}": ("F32", (per,), block) for i in range(count)})
    del block
    spec = {
        "attachments": [{"target": f"h.{i}", "kind": "steer", "tensors": {"vector": f"v{i}"}} for i in range(count)]
    }
    (out / "pack-spec.json").write_text(json.dumps(spec))
    artifact = out / "pack-output.safetensors"
    artifact.unlink(missing_ok=True)
    cmd = [
        REVREG, "pack", "--tensors", str(tensors_path), "--spec", str(out / "pack-spec.json"),
        "--base", "sha256:" + "ab" * 32, "--name", "big", "--version", "1.0.0", "--key", "bench",
        "--created", "2026-01-01T00:00:00Z", "-o", str(artifact),
    ]  # fmt: skip
    seconds, rss, code = timed(cmd, env)
    assert code == 0, "pack failed"
    size = artifact.stat().st_size
    result = {
        "artifact_gib": size / (1 << 30),
        "pack_seconds": seconds,
        "peak_rss_mib": rss / (1 << 20),
        "rss_per_artifact_byte": rss / size,
    }
    print(json.dumps(result, indent=1))
    (out / "bench_pack.json").write_text(json.dumps(result, indent=1))
    for path in (tensors_path, artifact):
        path.unlink()


if __name__ == "__main__":
    main()
