"""Identity hashing of a multi-GiB safetensors checkpoint against `openssl dgst -sha256`.

Ratios, not seconds: both run in the same session on the same page-cached file.
Targets (issue 2): sha256 >= 1.6x openssl, blake3 >= 5x, peak RSS well under 1 GiB at 4 GiB.

    python benchmarks/bench_identity.py [--gib 4] [--repeat 3] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from measure import timed

REVREG = str(Path(sys.executable).parent / "revreg")


def make_checkpoint(path: Path, gib: float) -> None:
    """F32 tensors of 256 MiB (random bytes, repeated block) plus a few small ones."""
    from revreg.artifacts.safetensors_io import encode_header

    block = os.urandom(64 << 20)
    big = 256 << 20
    count = max(1, int(gib * 4))
    entries = [(f"layers.{i}.weight", "F32", (big // 4,), big) for i in range(count)]
    entries += [(f"layers.{i}.bias", "F32", (1024,), 4096) for i in range(count)]
    header, order = encode_header(entries, None)
    sizes = {e[0]: e[3] for e in entries}
    with open(path, "wb") as fh:
        fh.write(header)
        for name in order:
            left = sizes[name]
            while left:
                piece = block[: min(left, len(block))]
                fh.write(piece)
                left -= len(piece)


def best(cmd: list[str], repeat: int) -> tuple[float, int]:
    runs = [timed(cmd) for _ in range(repeat)]
    if any(r[2] != 0 for r in runs):
        raise SystemExit(f"{cmd} failed")
    return min(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    if not shutil.which("openssl"):
        raise SystemExit("openssl is needed as the anchor")
    args.out.mkdir(exist_ok=True)
    results = {}
    for gib in sorted({1.0, args.gib}):
        path = args.out / f"checkpoint-{gib:g}gib.safetensors"
        if not path.exists() or path.stat().st_size < gib * (1 << 30):
            make_checkpoint(path, gib)
        timed(["cat", str(path)])  # warm the page cache for every contender alike
        size = path.stat().st_size
        openssl, _ = best(["openssl", "dgst", "-sha256", str(path)], args.repeat)
        sha, sha_rss = best([REVREG, "identity", str(path)], args.repeat)
        b3, b3_rss = best([REVREG, "identity", "--algorithm", "blake3", str(path)], args.repeat)
        results[f"{gib:g}GiB"] = {
            "bytes": size,
            "cores": os.cpu_count(),
            "openssl_sha256_s": round(openssl, 3),
            "revreg_sha256_s": round(sha, 3),
            "revreg_blake3_s": round(b3, 3),
            "speedup_sha256_vs_openssl": round(openssl / sha, 2),
            "speedup_blake3_vs_openssl": round(openssl / b3, 2),
            "peak_rss_sha256_mib": round(sha_rss / 2**20),
            "peak_rss_blake3_mib": round(b3_rss / 2**20),
            "openssl_gib_per_s": round(size / openssl / 2**30, 2),
        }
        print(json.dumps({f"{gib:g}GiB": results[f"{gib:g}GiB"]}, indent=1), flush=True)
    (args.out / "identity.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
