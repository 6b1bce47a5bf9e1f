"""Hostile load on `revreg serve`, loopback only, bounded in time.

Legitimate clients pull a published artifact, first alone (the anchor), then while 100+ hostile
connections run: slow uploads with a valid push token (slowloris), uploads and JSON bodies
without a token promising a gigabyte, oversized chunked uploads, oversized headers. Reports
legitimate p50/p99 latency in both runs and their ratio, the server's peak RSS (VmHWM of the
server process), the status codes every hostile request got (no 5xx allowed), and staging files
left afterwards.

    python benchmarks/bench_hostile.py [--hostile 120] [--pulls 60] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import workspace
from tests.conftest import make_artifact, minimal_predicate
from tests.server_helpers import free_port


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _pulls(url: str, token: str, ref: str, count: int) -> tuple[list[float], list[int]]:
    latencies, statuses = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for _ in range(count):
            start = time.perf_counter()
            r = client.get("/v1/artifact", params={"ref": ref})
            r.read()
            latencies.append(time.perf_counter() - start)
            statuses.append(r.status_code)
    return latencies, statuses


def _hostile(url: str, kind: int, push_token: str, stop: threading.Event, codes: list[int]) -> None:
    host, port = url.removeprefix("http://").split(":")
    heads = [
        # slowloris: a valid push token, a megabyte promised, a byte a second
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {push_token}\r\nX-Revreg-Name: demo\r\n"
        f"X-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: 1000000\r\n\r\n",
        # no token, a gigabyte promised
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: x\r\nX-Revreg-Name: demo\r\nContent-Length: {1 << 30}\r\n\r\n",
        # no token, a megabyte of JSON promised
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n",
        # oversized headers
        "GET /v1/versions HTTP/1.1\r\nHost: x\r\nX-Pad: " + "a" * 60000 + "\r\n\r\n",
    ]
    try:
        s = socket.create_connection((host, int(port)), timeout=120)
        s.sendall(heads[kind % len(heads)].encode())
        s.settimeout(0.5)
        data = b""
        while not stop.is_set() and b"\r\n" not in data:
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            except TimeoutError:
                if kind % len(heads) == 0:
                    try:
                        s.sendall(b"\0")
                    except OSError:
                        break
        s.close()
        codes.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0)
    except OSError:
        codes.append(0)


def _vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hostile", type=int, default=120)
    parser.add_argument("--pulls", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    from revreg.artifacts.attestation import sign_certification
    from revreg.artifacts.keys import Keyring
    from revreg.registry.service import Registry
    from revreg.registry.tokens import Tokens

    out, keys, env = workspace(args.out)
    reg_dir = out / "hostile-registry"
    if reg_dir.exists():
        import shutil

        shutil.rmtree(reg_dir)
    ring = Keyring(keys)
    if not (keys / "alice.key").exists():
        ring.generate("alice")
    if not (keys / "vera.key").exists():
        ring.generate("vera")
    reg = Registry.init(str(reg_dir))
    reg.trust_key(ring.public_pem("alice"), "alice", "publisher")
    reg.trust_key(ring.public_pem("vera"), "vera", "verifier")
    art = make_artifact(out / "hostile-demo.safetensors", keys, size=256 << 10)  # a 1 MiB artifact
    info = reg.push(art).version
    reg.record_certification(
        info.pinned, sign_certification(info.ref, info.digest, minimal_predicate(info.digest), ring.signer("vera"))
    )
    reg.publish(info.ref)
    reader = Tokens(reg).create("reader", ["read:*"])[0]
    pusher = Tokens(reg).create("pusher", ["push:*"])[0]
    reg.engine.dispose()

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "revreg"), "serve", "--registry", str(reg_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {reader}"}, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        _pulls(url, reader, info.ref, 5)  # warm-up
        quiet, quiet_codes = _pulls(url, reader, info.ref, args.pulls)

        stop, codes = threading.Event(), []
        threads = [
            threading.Thread(target=_hostile, args=(url, i, pusher, stop, codes), daemon=True)
            for i in range(args.hostile)
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        loud, loud_codes = _pulls(url, reader, info.ref, args.pulls)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        time.sleep(1.0)
        peak = _vmhwm(server.pid)
        staging = reg_dir / "blobs" / "tmp"
        leaked = len(list(staging.glob("*"))) if staging.is_dir() else 0
    finally:
        server.terminate()
        server.wait(timeout=30)

    result = {
        "quiet_p50_ms": statistics.median(quiet) * 1000,
        "quiet_p99_ms": _percentile(quiet, 0.99) * 1000,
        "hostile_p50_ms": statistics.median(loud) * 1000,
        "hostile_p99_ms": _percentile(loud, 0.99) * 1000,
        "p99_ratio": _percentile(loud, 0.99) / _percentile(quiet, 0.99),
        "legit_statuses": sorted(set(quiet_codes + loud_codes)),
        "hostile_requests": len(codes),
        "hostile_statuses": {str(c): codes.count(c) for c in sorted(set(codes))},
        "server_5xx": sum(1 for c in codes + loud_codes if c >= 500),
        "server_peak_rss_mib": peak / (1 << 20),
        "staging_files_left": leaked,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    (out / "bench_hostile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
