"""Registry benchmarks (issue 3), as ratios against anchors measured in the same run.

- push and pull of a ~1 GiB artifact against `dd conv=fsync` of the same file (a copy as durable
  as theirs), interleaved pairs, median ratio; a second push of the stored artifact against
  `openssl dgst -sha256` (one hash pass); peak RSS of each;
- `revreg ls` over 10,000 versions against `python -c pass` (and a check that torch stays out);
- 8 concurrent pushers on SQLite and on PostgreSQL: errors other than clean conflicts, throughput.

    python benchmarks/bench_registry.py [--gib 1] [--versions 10000] [--pushers 8] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from measure import quiet_disk, timed, workspace

from revreg.artifacts.artifact import Attachment, pack, utc_timestamp
from revreg.artifacts.keys import Keyring

BIN = Path(sys.executable).parent
REVREG = str(BIN / "revreg")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def artifact(
    path: Path, keys: Path, name: str, version: str, mib: int, seed: int = 0, tensor_hash: str = "blake3"
) -> Path:
    """A signed artifact of `mib` MiB of F32 steering vectors, 64 MiB per tensor; its tensors
    digest in `tensor_hash` (pack's default, blake3, or sha256 as artifacts packed before it)."""
    rng = np.random.default_rng(seed)
    per = 16 << 20  # floats per tensor
    count = max(1, mib // 64)
    block = rng.standard_normal(min(per, mib << 18)).astype("<f4").tobytes()
    tensors = {f"h.{i}.steer_vector": ("F32", (len(block) // 4,), block) for i in range(count)}
    atts = tuple(Attachment(f"h.{i}", "steer", {"vector": f"h.{i}.steer_vector"}) for i in range(count))
    pack(
        path,
        tensors,
        atts,
        name=name,
        version=version,
        base="sha256:" + "ab" * 32,
        signer=Keyring(keys).signer("bench"),
        created=utc_timestamp(),
        tensor_hash=tensor_hash,
    )
    return path


def setup_registry(location: str, store: str | None, keys: Path, env: dict[str, str]) -> None:
    cmd = [REVREG, "init", "--registry", location] + (["--store", store] if store else [])
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    subprocess.run(
        [REVREG, "keys", "trust", "bench", "--role", "publisher", "--registry", location],
        check=True,
        env=env,
        capture_output=True,
    )


def bench_push_pull(
    out: Path, keys: Path, env: dict[str, str], gib: float, repeat: int, tensor_hash: str = "blake3"
) -> dict:
    """Interleaved pairs: `dd conv=fsync` (a durable copy, as push and pull make) and push (then a
    second push of the stored artifact); the same anchor and pull. Ratios per pair, median. Every
    timed command starts on a quiet disk (measure.quiet_disk), and the order within each pair
    alternates, anchors and subjects alike."""
    art = artifact(out / "big.safetensors", keys, "big", "1.0.0", int(gib * 1024), tensor_hash=tensor_hash)
    size = art.stat().st_size
    timed(["cat", str(art)])
    dst = out / "dd-copy.safetensors"

    def durable_copy() -> float:
        dst.unlink(missing_ok=True)
        quiet_disk()
        seconds = timed(["dd", f"if={art}", f"of={dst}", "bs=4M", "conv=fsync", "status=none"])[0]
        dst.unlink()
        return seconds

    rows = []
    pulled = out / "pulled.safetensors"
    for i in range(repeat):
        reg = out / f"reg-push-{i}"
        shutil.rmtree(reg, ignore_errors=True)
        setup_registry(str(reg), None, keys, env)
        pulled.unlink(missing_ok=True)
        t: dict[str, Any] = {}

        def push(t: dict[str, Any] = t, reg: Path = reg) -> None:
            quiet_disk()
            t["push"] = timed([REVREG, "push", str(art), "--registry", str(reg)], env)
            quiet_disk()
            t["again"] = timed([REVREG, "push", str(art), "--registry", str(reg)], env)

        def pull(t: dict[str, Any] = t, reg: Path = reg) -> None:
            quiet_disk()
            cmd = [REVREG, "pull", "big:1.0.0", "--allow-unpublished", "-o", str(pulled), "--registry", str(reg)]
            t["pull"] = timed(cmd, env)

        def anchor(key: str, t: dict[str, Any] = t) -> Callable[[], None]:
            return lambda: t.__setitem__(key, durable_copy())

        # A 1 GiB write right after another runs slower here, even after sync (the dd after a push
        # took 3.0-3.8 s, the one after a quiet spell 1.8-3.0 s): so the order alternates, anchor
        # first in even pairs and subject first in odd ones, and neither gains from its place.
        steps = (
            [anchor("dd_push"), push, anchor("dd_pull"), pull]
            if i % 2 == 0
            else [push, anchor("dd_push"), pull, anchor("dd_pull")]
        )
        for step in steps:
            step()
        hash_pass = timed(["openssl", "dgst", "-sha256", str(art)])[0]
        assert t["push"][2] == 0 and t["again"][2] == 0 and t["pull"][2] == 0
        rows.append((t["dd_push"], t["push"], t["again"], t["dd_pull"], t["pull"], hash_pass))
        shutil.rmtree(reg)
        pulled.unlink()
    med = statistics.median
    return {
        "artifact_bytes": size,
        "tensor_hash": tensor_hash,
        "pairs": repeat,
        "durable_copy_s": round(med(r[0] for r in rows), 3),
        "push_s": round(med(r[1][0] for r in rows), 3),
        "pull_s": round(med(r[4][0] for r in rows), 3),
        "push_vs_durable_copy": round(med(r[0] / r[1][0] for r in rows), 2),
        "pull_vs_durable_copy": round(med(r[3] / r[4][0] for r in rows), 2),
        "push_stored_s": round(med(r[2][0] for r in rows), 3),
        "openssl_sha256_s": round(med(r[5] for r in rows), 3),
        "push_stored_vs_one_hash_pass": round(med(r[2][0] / r[5] for r in rows), 2),
        "push_peak_rss_mib": round(max(r[1][1] for r in rows) / 2**20),
        "pull_peak_rss_mib": round(max(r[4][1] for r in rows) / 2**20),
        "push_stored_peak_rss_mib": round(max(r[2][1] for r in rows) / 2**20),
        "raw_s": [
            [round(r[0], 2), round(r[1][0], 2), round(r[2][0], 2), round(r[3], 2), round(r[4][0], 2)] for r in rows
        ],
    }


def ls_registry(out: Path, keys: Path, env: dict[str, str], versions: int) -> Path:
    """An embedded registry holding `versions` + 1 versions (rows copied from one real push)."""
    from sqlalchemy import insert, select

    from revreg.registry.models import Behavior, Version
    from revreg.registry.service import Registry

    reg_dir = out / f"reg-ls-{versions}"
    if (reg_dir / "registry.db").exists():
        return reg_dir
    setup_registry(str(reg_dir), None, keys, env)
    subprocess.run(
        [REVREG, "push", str(artifact(out / "seed.safetensors", keys, "seed", "1.0.0", 1)), "--registry", str(reg_dir)],
        check=True,
        env=env,
        capture_output=True,
    )
    reg = Registry.open(str(reg_dir))
    with reg.engine.begin() as conn:
        template = conn.execute(select(Version)).mappings().one()
        now = datetime.now(UTC)
        rows = []
        for b in range(0, versions, 100):  # behaviors of 100 versions each, the last one the rest
            bid = conn.execute(
                insert(Behavior).values(name=f"behavior-{b // 100:04d}", created_at=now)
            ).inserted_primary_key[0]
            rows += [
                {
                    **{k: v for k, v in template.items() if k != "id"},
                    "behavior_id": bid,
                    "version": f"1.0.{i}",
                    "pushed_at": now,
                }
                for i in range(min(100, versions - b))
            ]
        if rows:
            conn.execute(insert(Version), rows)
    reg.engine.dispose()
    return reg_dir


def bench_ls(out: Path, keys: Path, env: dict[str, str], versions: int, repeat: int) -> dict:
    reg_dir = ls_registry(out, keys, env, versions)
    baseline = min(timed([sys.executable, "-c", "pass"])[0] for _ in range(repeat))
    ls_runs = [timed([REVREG, "ls", "--registry", str(reg_dir)], env) for _ in range(repeat)]
    assert all(r[2] == 0 for r in ls_runs)
    ls_json = min(timed([REVREG, "ls", "--json", "--registry", str(reg_dir)], env)[0] for _ in range(repeat))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom revreg.cli.main import cli\ntry:\n cli.main(['ls', '--registry', "
            f"{str(reg_dir)!r}])\nexcept SystemExit:\n pass\nprint('torch' in sys.modules, 'sqlalchemy' in sys.modules,"
            " file=sys.stderr)",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    torch_in, sqlalchemy_in = probe.stderr.strip().splitlines()[-1].split()
    return {
        "versions": versions + 1,
        "python_pass_s": round(baseline, 3),
        "ls_s": round(min(r[0] for r in ls_runs), 3),
        "ls_json_s": round(ls_json, 3),
        "ls_vs_python_pass": round(min(r[0] for r in ls_runs) / baseline, 1),
        "torch_imported": torch_in == "True",
        "sqlalchemy_imported": sqlalchemy_in == "True",
    }


def bench_concurrency(out: Path, keys: Path, env: dict[str, str], pushers: int, backend: str) -> dict:
    import psycopg

    store = None
    db_name = None
    if backend == "sqlite":
        location = str(out / "reg-conc-sqlite")
        shutil.rmtree(location, ignore_errors=True)
    else:
        db_name = f"revreg_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')
        location = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"
        store = str(out / "reg-conc-pg-blobs")
        shutil.rmtree(store, ignore_errors=True)
    setup_registry(location, store, keys, env)
    per_pusher = 5
    work = []
    for p in range(pushers):
        for i in range(per_pusher):
            # Every pusher also races the others on one shared version with its own bytes.
            work.append(
                (p, artifact(out / f"c-{p}-{i}.safetensors", keys, f"conc-{p}", f"1.0.{i}", 1, seed=p * 100 + i))
            )
        work.append((p, artifact(out / f"c-{p}-shared.safetensors", keys, "shared", "1.0.0", 1, seed=p)))
    by_pusher = {p: [str(a) for q, a in work if q == p] for p in range(pushers)}

    def run_pusher(p: int) -> list[tuple[int, str]]:
        results = []
        for path in by_pusher[p]:
            proc = subprocess.run(
                [REVREG, "push", path, "--registry", location], env=env, capture_output=True, text=True
            )
            results.append((proc.returncode, proc.stderr.strip()))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(pushers) as pool:
        results = [r for rs in pool.map(run_pusher, range(pushers)) for r in rs]
    elapsed = time.perf_counter() - start
    conflicts = [e for c, e in results if c != 0 and "already exists with digest" in e]
    errors = [e for c, e in results if c != 0 and "already exists with digest" not in e]
    fsck = subprocess.run([REVREG, "fsck", "--registry", location], env=env, capture_output=True, text=True)
    audit = subprocess.run([REVREG, "audit", "verify", "--registry", location], env=env, capture_output=True, text=True)
    if db_name:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{db_name}" WITH (FORCE)')
    return {
        "pushers": pushers,
        "pushes": len(results),
        "succeeded": sum(1 for c, _ in results if c == 0),
        "clean_conflicts": len(conflicts),
        "other_errors": errors[:3],
        "pushes_per_s": round(len(results) / elapsed, 1),
        "fsck_ok": fsck.returncode == 0,
        "audit_ok": audit.returncode == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--versions", type=int, default=10000)
    parser.add_argument("--pushers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--only", choices=["pushpull", "ls", "concurrency"], default=None)
    parser.add_argument(
        "--tensor-hash", choices=["blake3", "sha256"], default="blake3", help="the 1 GiB artifact's tensors digest"
    )
    args = parser.parse_args()
    out, keys, env = workspace(args.out)
    results: dict[str, object] = {}
    if args.only in (None, "pushpull"):
        results["push_pull"] = bench_push_pull(out, keys, env, args.gib, args.repeat, args.tensor_hash)
        print(json.dumps(results["push_pull"], indent=1), flush=True)
    if args.only in (None, "ls"):
        results["ls"] = bench_ls(out, keys, env, args.versions, args.repeat)
        print(json.dumps(results["ls"], indent=1), flush=True)
    if args.only in (None, "concurrency"):
        for backend in ("sqlite", "postgresql"):
            results[f"concurrency_{backend}"] = bench_concurrency(out, keys, env, args.pushers, backend)
            print(backend, json.dumps(results[f"concurrency_{backend}"], indent=1), flush=True)
    (out / "registry.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
