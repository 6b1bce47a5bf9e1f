"""Reliability campaign (issue 8): kill push, certify and publish with SIGKILL at random moments,
N trials each, on SQLite and PostgreSQL; after every kill `revreg fsck` must be clean, the audit
chain intact and the state consistent, and the same operation must then succeed.

    python benchmarks/reliability.py [--trials 50] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import torch
from bench_registry import PG_ADMIN, REVREG, setup_registry
from measure import workspace
from safetensors.torch import save_file

from revreg.artifacts.artifact import Attachment, pack, utc_timestamp
from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import ProbeManifest, write_probes
from revreg.artifacts.sources import identity_of_path
from revreg.registry.service import Registry

TOY = "revreg.verifier.toy:build"


def _kill(cmd: list[str], env: dict[str, str], delay: float) -> bool:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def _consistent(reg: Registry) -> bool:
    return reg.fsck().problems == () and reg.audit_verify().ok


def campaign(out: Path, keys: Path, backend: str, trials: int) -> dict:
    from revreg.verifier.toy import build

    env = {**os.environ, "REVREG_KEYS": str(keys)}
    db = None
    if backend == "sqlite":
        location, store = str(out / f"rel-{uuid.uuid4().hex[:6]}"), None
    else:
        db = f"revreg_rel_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        location, store = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}", str(out / f"rel-blobs-{db}")
    setup_registry(location, store, keys, env)
    subprocess.run(
        [REVREG, "keys", "trust", "bench", "--role", "verifier", "--registry", location],
        env=env,
        check=True,
        capture_output=True,
    )
    env["REVREG_REGISTRY"] = location
    base = out / "rel-base.safetensors"
    save_file(build().state_dict(), base)
    identity = identity_of_path(base).identity
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    probes = out / "rel.probes"
    write_probes(
        probes,
        {"input_ids": ("I64", (8, 12), ids.numpy().tobytes())},
        ProbeManifest("rel", ("input_ids",), "output", "kl", None, 4, 8),
    )
    rng = random.Random(backend)
    g = torch.Generator().manual_seed(1)
    big, small = [], []
    signer = Keyring(keys).signer("bench")
    for i in range(trials):
        a, b = torch.randn(4, 32, generator=g), torch.randn(64, 4, generator=g)
        lora = {"up.lora_A": ("F32", (4, 32), a.numpy().tobytes()), "up.lora_B": ("F32", (64, 4), b.numpy().tobytes())}
        att = Attachment("up", "lora", {"A": "up.lora_A", "B": "up.lora_B"}, layer="linear", rank=4, alpha=4.0)
        # Pushes carry 4 MiB more (a vector for a target that push does not resolve) so that a push
        # lasts long enough to be interrupted; certify and publish use the plain LoRA.
        pad = torch.randn(1 << 20, generator=g).numpy().tobytes()
        big.append(out / f"rel-big-{i}.safetensors")
        pack(
            big[-1],
            {**lora, "pad.steer_vector": ("F32", (1 << 20,), pad)},
            (att, Attachment("pad", "steer", {"vector": "pad.steer_vector"})),
            name="relpush",
            version=f"1.0.{i}",
            base=identity,
            signer=signer,
            created=utc_timestamp(),
        )
        small.append(out / f"rel-{i}.safetensors")
        pack(
            small[-1],
            lora,
            (att,),
            name="rel",
            version=f"1.0.{i}",
            base=identity,
            signer=signer,
            created=utc_timestamp(),
        )
    reg = Registry.open(location)
    for path in small:
        reg.push(path)
    report = {}
    operations = {
        "push": lambda i: [REVREG, "push", str(big[i])],
        "certify": lambda i: [
            REVREG,
            "certify",
            f"rel:1.0.{i}",
            "--base",
            str(base),
            "--factory",
            TOY,
            "--probes",
            str(probes),
            "--key",
            "bench",
        ],
        "publish": lambda i: [REVREG, "publish", f"rel:1.0.{i}"],
    }
    for op, cmd in operations.items():
        start = time.perf_counter()
        subprocess.run(cmd(0), env=env, capture_output=True)  # trial 0 runs whole: it times the operation
        full = time.perf_counter() - start
        killed = consistent = repeated = 0
        for i in range(1, trials):
            killed += _kill(cmd(i), env, rng.uniform(0.1, 1.1) * full)
            consistent += _consistent(reg)
            repeated += subprocess.run(cmd(i), env=env, capture_output=True).returncode == 0
        report[op] = {
            "trials": trials - 1,
            "killed_mid_run": killed,
            "consistent_after_kill": consistent,
            "succeeded_when_repeated": repeated,
            "seconds_per_operation": round(full, 2),
        }
        print(backend, op, report[op], flush=True)
    states = {v.state for v in reg.ls()}
    report["final"] = {
        "versions": len(reg.ls()),
        "states": sorted(states),
        "fsck_clean": _consistent(reg),
        "lost_versions": 2 * trials - len(reg.ls()),
    }
    reg.engine.dispose()
    if db:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    out, keys, _ = workspace(args.out)
    backends = args.backends.split(",")
    results = {backend: campaign(out, keys, backend, args.trials + 1) for backend in backends}
    (out / f"reliability-{'-'.join(backends)}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
