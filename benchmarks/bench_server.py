"""Remote registry benchmarks (issue 6), as ratios against the local registry in the same run.

- push and pull of a ~1 GiB artifact over loopback HTTP against the same through the local
  registry (both via the CLI, both with fsync and every check);
- 16 concurrent clients against one server on PostgreSQL: errors other than clean conflicts,
  and throughput.

    python benchmarks/bench_server.py [--gib 1] [--clients 16] [--repeat 5] [--only transfer|clients] [--out bench-out]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_registry import PG_ADMIN, REVREG, artifact, setup_registry
from measure import quiet_disk, timed, workspace


def start_server(location: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [REVREG, "serve", "--registry", location, "--port", str(port), "--max-upload", "8GiB"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import httpx

    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def token(location: str, env: dict[str, str]) -> str:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    out = subprocess.run(
        [REVREG, "tokens", "create", name, "--scope", "admin:*", "--registry", location],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def bench_transfer(
    out: Path, keys: Path, env: dict[str, str], gib: float, repeat: int, tensor_hash: str = "blake3"
) -> dict:
    """Interleaved rounds: push + pull through the local registry and the same over loopback
    HTTP, in alternating order, each command on a quiet disk; ratios per round (local time /
    remote time), median. Also a second remote push of the
    stored artifact (one local hash pass and one request: no body is sent), and the CPU time
    the server spent on each remote push (user + system, from /proc)."""
    art = artifact(out / "big.safetensors", keys, "big", "1.0.0", int(gib * 1024), tensor_hash=tensor_hash)
    timed(["cat", str(art)])
    rounds = []
    for i in range(repeat):
        times: dict[str, float] = {}
        # Alternating which goes first: a 1 GiB write right after another is slower here.
        for kind in ("local", "remote") if i % 2 == 0 else ("remote", "local"):
            reg = out / f"reg-{kind}-{i}"
            shutil.rmtree(reg, ignore_errors=True)
            setup_registry(str(reg), None, keys, env)
            e, location, server = dict(env), str(reg), None
            if kind == "remote":
                e["REVREG_TOKEN"] = token(str(reg), env)
                server = start_server(str(reg), 8490 + i, env)
                location = f"http://127.0.0.1:{8490 + i}"
            dest = out / "pulled.safetensors"
            dest.unlink(missing_ok=True)
            quiet_disk()
            before = cpu_seconds(server.pid) if server else 0.0
            push = timed([REVREG, "push", str(art), "--registry", location], e)
            if server:
                times["server_push_cpu"] = cpu_seconds(server.pid) - before
            quiet_disk()
            again = timed([REVREG, "push", str(art), "--registry", location], e)
            quiet_disk()
            pull = timed(
                [REVREG, "pull", "big:1.0.0", "--allow-unpublished", "-o", str(dest), "--registry", location], e
            )
            assert push[2] == 0 and again[2] == 0 and pull[2] == 0, kind
            times |= {f"{kind}_push": push[0], f"{kind}_push_stored": again[0], f"{kind}_pull": pull[0]}
            times[f"{kind}_rss"] = max(push[1], pull[1])
            if server:
                server.terminate()
                server.wait()
            shutil.rmtree(reg)
            dest.unlink(missing_ok=True)
        rounds.append(times)
    med = statistics.median
    return {
        "artifact_bytes": art.stat().st_size,
        "tensor_hash": tensor_hash,
        "rounds": repeat,
        "local_push_s": round(med(r["local_push"] for r in rounds), 3),
        "remote_push_s": round(med(r["remote_push"] for r in rounds), 3),
        "local_pull_s": round(med(r["local_pull"] for r in rounds), 3),
        "remote_pull_s": round(med(r["remote_pull"] for r in rounds), 3),
        "remote_push_speed_vs_local": round(med(r["local_push"] / r["remote_push"] for r in rounds), 2),
        "remote_pull_speed_vs_local": round(med(r["local_pull"] / r["remote_pull"] for r in rounds), 2),
        "remote_push_stored_s": round(med(r["remote_push_stored"] for r in rounds), 3),
        "local_push_stored_s": round(med(r["local_push_stored"] for r in rounds), 3),
        "client_peak_rss_mib": round(max(r["remote_rss"] for r in rounds) / 2**20),
        "server_cpu_per_push_s": round(med(r["server_push_cpu"] for r in rounds), 2),
    }


def bench_clients(out: Path, keys: Path, env: dict[str, str], clients: int) -> dict:
    import psycopg

    db = f"revreg_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    location = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    store = out / "srv-pg-blobs"
    shutil.rmtree(store, ignore_errors=True)
    setup_registry(location, str(store), keys, env)
    e = {**env, "REVREG_TOKEN": token(location, env)}
    server = start_server(location, 8499, env)
    url = "http://127.0.0.1:8499"
    work = {
        c: [
            artifact(out / f"s-{c}-{i}.safetensors", keys, f"client-{c}", f"1.0.{i}", 1, seed=c * 10 + i)
            for i in range(3)
        ]
        + [artifact(out / f"s-{c}-shared.safetensors", keys, "shared", "1.0.0", 1, seed=c)]
        for c in range(clients)
    }

    def client(c: int) -> list[tuple[int, str]]:
        results = []
        for path in work[c]:
            p = subprocess.run([REVREG, "push", str(path), "--registry", url], env=e, capture_output=True, text=True)
            results.append((p.returncode, p.stderr.strip()))
        p = subprocess.run([REVREG, "ls", "--registry", url], env=e, capture_output=True, text=True)
        results.append((p.returncode, p.stderr.strip()))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    elapsed = time.perf_counter() - start
    server.terminate()
    server.wait()
    conflicts = [m for c, m in results if c != 0 and "already exists with digest" in m]
    others = [m for c, m in results if c != 0 and "already exists with digest" not in m]
    audit = subprocess.run([REVREG, "audit", "verify", "--registry", location], env=env, capture_output=True)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    return {
        "clients": clients,
        "requests": len(results),
        "succeeded": sum(c == 0 for c, _ in results),
        "clean_conflicts": len(conflicts),
        "other_errors": others[:3],
        "requests_per_s": round(len(results) / elapsed, 1),
        "audit_ok": audit.returncode == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--only", choices=["transfer", "clients"], default=None)
    parser.add_argument(
        "--tensor-hash", choices=["blake3", "sha256"], default="blake3", help="the 1 GiB artifact's tensors digest"
    )
    args = parser.parse_args()
    out, keys, env = workspace(args.out)
    results = {}
    if args.only in (None, "transfer"):
        results["transfer"] = bench_transfer(out, keys, env, args.gib, args.repeat, args.tensor_hash)
        print(json.dumps(results["transfer"], indent=1), flush=True)
    if args.only in (None, "clients"):
        results["clients"] = bench_clients(out, keys, env, args.clients)
        print(json.dumps(results["clients"], indent=1), flush=True)
    (out / "server.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
