"""Scale-path benchmarks (issue 7): worker throughput from 1 to N workers, queue claim latency on
PostgreSQL, and S3 push/pull against the filesystem store in the same run.

    python benchmarks/bench_scale.py [--requests 12] [--workers 1,2,3] [--mib 256] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import torch
from bench_registry import PG_ADMIN, REVREG, artifact, setup_registry
from measure import timed, workspace
from safetensors.torch import save_file

from revreg.artifacts.artifact import Attachment, pack, utc_timestamp
from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import ProbeManifest, write_probes
from revreg.artifacts.sources import identity_of_path
from revreg.registry.queue import Queue
from revreg.registry.service import Registry

TOY = "revreg.verifier.toy:build"


def pg_database() -> tuple[str, str]:
    name = f"revreg_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def toy_inputs(out: Path, keys: Path) -> tuple[Path, Path]:
    from revreg.verifier.toy import build

    save_file(build().state_dict(), out / "toy-base.safetensors")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (32, 16), generator=g)
    write_probes(
        out / "toy.probes",
        {"input_ids": ("I64", (32, 16), ids.numpy().tobytes())},
        ProbeManifest("toy", ("input_ids",), "output", "kl", None, 8, 32),
    )
    return out / "toy-base.safetensors", out / "toy.probes"


def bench_workers(out: Path, keys: Path, env: dict[str, str], requests: int, counts: list[int]) -> dict:
    base, probes = toy_inputs(out, keys)
    identity = identity_of_path(base).identity
    results = {}
    for n in counts:
        db, url = pg_database()
        setup_registry(url, str(out / f"w-blobs-{n}"), keys, env)
        subprocess.run(
            [REVREG, "keys", "trust", "bench", "--role", "verifier", "--registry", url],
            env=env,
            check=True,
            capture_output=True,
        )
        reg = Registry.open(url)
        g = torch.Generator().manual_seed(n)
        for i in range(requests):
            a, b = torch.randn(4, 32, generator=g), torch.randn(64, 4, generator=g)
            path = out / f"w-{n}-{i}.safetensors"
            pack(
                path,
                {
                    "up.lora_A": ("F32", (4, 32), a.numpy().tobytes()),
                    "up.lora_B": ("F32", (64, 4), b.numpy().tobytes()),
                },
                (Attachment("up", "lora", {"A": "up.lora_A", "B": "up.lora_B"}, layer="linear", rank=4, alpha=4.0),),
                name="toy",
                version=f"1.0.{i}",
                base=identity,
                signer=Keyring(keys).signer("bench"),
                created=utc_timestamp(),
            )
            reg.push(path)
            Queue(reg).request(f"toy:1.0.{i}", str(base), str(probes), TOY)
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [REVREG, "worker", "--key", "bench", "--drain", "--poll", "0.2", "--registry", url, "--id", f"w{k}"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for k in range(n)
        ]
        for p in procs:
            p.wait()
        elapsed = time.perf_counter() - start
        states = Queue(reg).counts()
        certs = sum(len(reg.show(f"toy:1.0.{i}").certifications) for i in range(requests))
        reg.engine.dispose()
        drop(db)
        results[f"{n}_workers"] = {
            "seconds": round(elapsed, 2),
            "requests_per_s": round(requests / elapsed, 2),
            "states": states,
            "certifications": certs,
        }
        print(n, results[f"{n}_workers"], flush=True)
    first = results[f"{counts[0]}_workers"]["requests_per_s"]
    for v in results.values():
        v["speedup_vs_1"] = round(v["requests_per_s"] / first, 2)
    return results


def bench_claims(out: Path, keys: Path, env: dict[str, str], queued: int = 1000) -> dict:
    db, url = pg_database()
    setup_registry(url, str(out / "c-blobs"), keys, env)
    reg = Registry.open(url)
    reg.push(artifact(out / "c.safetensors", keys, "claim", "1.0.0", 1))
    q = Queue(reg)
    for _ in range(queued):
        q.request("claim:1.0.0", "/base", "probes")
    times = []
    for i in range(200):
        t = time.perf_counter()
        assert q.claim(f"bench-{i}", 60) is not None
        times.append(time.perf_counter() - t)
    reg.engine.dispose()
    drop(db)
    return {
        "queued": queued,
        "claims": len(times),
        "median_ms": round(statistics.median(times) * 1000, 2),
        "p95_ms": round(sorted(times)[int(len(times) * 0.95)] * 1000, 2),
    }


def bench_s3(out: Path, keys: Path, env: dict[str, str], mib: int) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5399, verbose=False)
    server.start()
    s3env = {
        **env,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5399",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "REVREG_STAGING": str(out / "s3-staging"),
    }
    boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:5399",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="revreg-bench")
    art = artifact(out / "s3.safetensors", keys, "s3", "1.0.0", mib)
    runs = {}
    for kind, store in (("filesystem", None), ("s3", "s3://revreg-bench/blobs")):
        reg = out / f"s3-reg-{kind}"
        shutil.rmtree(reg, ignore_errors=True)
        setup_registry(str(reg), store, keys, s3env)
        dest = out / "s3-pulled.safetensors"
        dest.unlink(missing_ok=True)
        push = timed([REVREG, "push", str(art), "--registry", str(reg)], s3env)
        pull = timed(
            [REVREG, "pull", "s3:1.0.0", "--allow-unpublished", "-o", str(dest), "--registry", str(reg)], s3env
        )
        assert push[2] == 0 and pull[2] == 0, kind
        runs[kind] = (push[0], pull[0])
        shutil.rmtree(reg)
    server.stop()
    return {
        "artifact_mib": mib,
        "fs_push_s": round(runs["filesystem"][0], 2),
        "s3_push_s": round(runs["s3"][0], 2),
        "fs_pull_s": round(runs["filesystem"][1], 2),
        "s3_pull_s": round(runs["s3"][1], 2),
        "s3_push_speed_vs_fs": round(runs["filesystem"][0] / runs["s3"][0], 2),
        "s3_pull_speed_vs_fs": round(runs["filesystem"][1] / runs["s3"][1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    out, keys, env = workspace(args.out)
    results = {"claims": bench_claims(out, keys, env)}
    print(json.dumps(results["claims"]), flush=True)
    results["s3"] = bench_s3(out, keys, env, args.mib)
    print(json.dumps(results["s3"]), flush=True)
    results["workers"] = bench_workers(out, keys, env, args.requests, [int(n) for n in args.workers.split(",")])
    (out / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
