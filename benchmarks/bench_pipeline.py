"""The one-pass pipeline in-process (issue 17): why its blocks are page-aligned, and their size.

- the kernel's copy of 1 GiB from the page cache into a 256 KiB buffer that starts on a page
  boundary (`store.aligned_block`) or 16, 32 or 64 bytes past one (a bytearray's data starts 16
  bytes into a freshly mapped page), and from each into a file (no fsync), interleaved, median
  of --repeat;

- sha256 throughput of this machine's hashlib on data in cache (16 KiB updates of one buffer)
  and on data read back from memory (one 256 MiB buffer), and blake3's on one core;
- a durable one-pass copy of a 1 GiB artifact (write + file sha256 + every tensor's digests,
  `store.copy_hashing` with the `artifacts.stream` tap) with 256 KiB blocks against 4 MiB blocks,
  interleaved, median of --repeat; the same pass with `fdatasync` every 16 MiB, every 64 MiB or
  only at the end; and the same pass with nothing written (a stored push);
- `--only allocator`: the CPU time (user + system) a uvicorn server on uvloop and httptools (as
  `revreg serve` runs) spends receiving the artifact as one HTTP upload over loopback, with
  glibc's default allocator settings and with `revreg.allocator`'s, interleaved, median of
  --repeat.

    python benchmarks/bench_pipeline.py [--gib 1] [--repeat 5] [--only copies|allocator] [--out bench-out]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

from bench_registry import artifact
from measure import workspace

import revreg.registry.store as store
from revreg.artifacts.stream import ArtifactStream


def sha256_rates() -> dict:
    small = os.urandom(16 << 10)
    h, t = hashlib.sha256(), time.perf_counter()
    for _ in range(16384):
        h.update(small)
    in_cache = 0.25 / (time.perf_counter() - t)
    big = os.urandom(256 << 20)
    t = time.perf_counter()
    hashlib.sha256(big).digest()
    from_memory = 0.25 / (time.perf_counter() - t)
    import blake3

    t = time.perf_counter()
    blake3.blake3(big).digest()  # one thread (AVX-512 where the CPU has it)
    blake3_one_core = 0.25 / (time.perf_counter() - t)
    return {
        "sha256_in_cache_gib_s": round(in_cache, 2),
        "sha256_from_memory_gib_s": round(from_memory, 2),
        "blake3_one_core_from_memory_gib_s": round(blake3_one_core, 2),
    }


def copy_rates(src: Path, scratch: Path, repeat: int) -> dict:
    """Seconds to read `src` (in the page cache) into a 256 KiB buffer, and to write as much from
    it, by where the buffer starts: on a page boundary (`store.aligned_block`), 16 bytes past one
    (where a bytearray's data starts when the allocator maps it a fresh page, as in a new
    process), 32 or 64 bytes past one. Interleaved, median of `repeat`."""
    size, block = src.stat().st_size, 256 << 10
    backing = {off: store.aligned_block(block + 4096) for off in (0, 16, 32, 64)}
    kinds = {f"offset_{off}": memoryview(buf)[off : off + block] for off, buf in backing.items()}
    reads: dict[str, list[float]] = {k: [] for k in kinds}
    writes: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for kind, buf in kinds.items():
            with open(src, "rb", buffering=0) as fh:
                t = time.perf_counter()
                while fh.readinto(buf):  # type: ignore[attr-defined]
                    pass
                reads[kind].append(time.perf_counter() - t)
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            t = time.perf_counter()
            for _ in range(size // block):
                os.write(fd, buf)
            writes[kind].append(time.perf_counter() - t)
            os.close(fd)
            scratch.unlink()
            os.sync()
    med = statistics.median
    return {
        "read_1GiB_from_page_cache_s": {k: round(med(v), 3) for k, v in reads.items()},
        "write_1GiB_to_page_cache_s": {k: round(med(v), 3) for k, v in writes.items()},
        "read_16_bytes_off_vs_aligned": round(
            med(b / a for a, b in zip(reads["offset_0"], reads["offset_16"], strict=True)), 2
        ),
        "write_16_bytes_off_vs_aligned": round(
            med(b / a for a, b in zip(writes["offset_0"], writes["offset_16"], strict=True)), 2
        ),
    }


RECEIVING_SERVER = """
import resource, sys
import uvicorn
from revreg.allocator import keep_freed_memory

if sys.argv[1] == "tuned":
    assert keep_freed_memory(), "mallopt did not take"


async def sink(scope, receive, send):
    # Receives a body the way revreg's upload does (uvicorn on uvloop and httptools, chunk by
    # chunk) and answers the CPU time (user + system) the process spent while it arrived.
    if scope["type"] != "http":
        return
    start, more = resource.getrusage(resource.RUSAGE_SELF), True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    end = resource.getrusage(resource.RUSAGE_SELF)
    body = str(end.ru_utime - start.ru_utime + end.ru_stime - start.ru_stime).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


uvicorn.run(sink, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools", log_level="warning")
"""


def allocator_cpu(src: Path, repeat: int) -> dict:
    """Server CPU seconds to receive `src` over loopback HTTP, by allocator settings."""
    import subprocess
    import sys

    import httpx

    def received(mode: str, port: int) -> float:
        server = subprocess.Popen([sys.executable, "-c", RECEIVING_SERVER, mode, str(port)])
        try:
            for _ in range(200):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            with open(src, "rb") as fh:
                return float(httpx.put(f"http://127.0.0.1:{port}/", content=fh, timeout=600).text)
        finally:
            server.terminate()
            server.wait()

    runs: dict[str, list[float]] = {"default": [], "tuned": []}
    for i in range(repeat):
        for mode in ("default", "tuned") if i % 2 == 0 else ("tuned", "default"):
            runs[mode].append(received(mode, 8530 + i))
    gib = src.stat().st_size / 2**30
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "received_bytes": src.stat().st_size,
        "allocator_server_cpu_s_per_gib": {k: round(v / gib, 3) for k, v in med.items()},
        "allocator_default_over_tuned": round(med["default"] / max(med["tuned"], 1e-9), 2),
    }


def one_pass(src: Path, out: Path | None, block: int, blocks: int, flush: int = store.FLUSH_EVERY) -> float:
    store.BLOCK, store.PIPELINE_BLOCKS, store.FLUSH_EVERY = block, blocks, flush
    size = src.stat().st_size
    if out is not None:
        out.unlink(missing_ok=True)
    t = time.perf_counter()
    with open(src, "rb") as fh:
        tap = ArtifactStream(str(out or src), size)
        if out is None:
            store.copy_hashing(fh, None, tap=tap)
        else:
            with open(out, "w+b", buffering=0) as sink:
                store.copy_hashing(fh, sink, durable=True, tap=tap)
        tap.finish()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--only", choices=["copies", "allocator"], default=None, help="only the copy rates, or only the allocator"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    out, keys, _ = workspace(args.out)
    src = artifact(out / "big.safetensors", keys, "big", "1.0.0", int(args.gib * 1024))
    if args.only == "allocator":
        results = allocator_cpu(src, args.repeat)
        print(json.dumps(results, indent=1))
        (out / "allocator.json").write_text(json.dumps(results, indent=1) + "\n")
        return
    dst = out / "pipeline.out"
    default = (store.BLOCK, store.PIPELINE_BLOCKS)
    shapes = {"256KiB x 16": (256 << 10, 16), "4MiB x 8": (4 << 20, 8)}
    flushes = {"every 16 MiB": 16 << 20, "every 64 MiB": 64 << 20, "once, at the end": 1 << 62}
    flushed: dict[str, list[float]] = {k: [] for k in flushes}
    durable: dict[str, list[float]] = {k: [] for k in shapes}
    read_only: dict[str, list[float]] = {k: [] for k in shapes}
    one_pass(src, None, *default)  # page cache
    copies = copy_rates(src, out / "copy.scratch", args.repeat)
    if args.only == "copies":
        print(json.dumps(copies, indent=1))
        return
    for _ in range(args.repeat):
        for name, shape in shapes.items():
            durable[name].append(one_pass(src, dst, *shape))
            read_only[name].append(one_pass(src, None, *shape))
        for name, every in flushes.items():
            flushed[name].append(one_pass(src, dst, *default, flush=every))
    dst.unlink(missing_ok=True)
    results = {
        **sha256_rates(),
        **copies,
        "artifact_bytes": src.stat().st_size,
        "durable_one_pass_s": {k: round(statistics.median(v), 3) for k, v in durable.items()},
        "stored_push_pass_s": {k: round(statistics.median(v), 3) for k, v in read_only.items()},
        "durable_one_pass_by_fdatasync_interval_s": {k: round(statistics.median(v), 3) for k, v in flushed.items()},
        "durable_speedup_256KiB_over_4MiB": round(
            statistics.median(b / a for a, b in zip(durable["256KiB x 16"], durable["4MiB x 8"], strict=True)), 2
        ),
    }
    print(json.dumps(results, indent=1))
    (out / "pipeline.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
