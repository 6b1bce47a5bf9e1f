"""Start-up and end-to-end benchmarks (issue 17), each a ratio against an anchor measured in the
same run, as the median over interleaved pairs (anchor, then revreg, then anchor, ...):

- `revreg --help` against `python -c pass` (target <= 4x);
- `revreg ls` over 10,001 versions of an embedded registry against `python -c pass` (<= 8x);
- `revreg verify` end to end (a tiny GPT-2 directory, a LoRA on every linear layer, 16 probes,
  3 cycles) against the work it cannot avoid, in a fresh interpreter too: importing torch and
  transformers, loading the model from the directory, and the protocol's 8 forward passes
  (<= 1.5x). The verify run also reports whether torch._dynamo was imported;
- what the embedded push/pull path keeps off its critical path (`--only sql`): importing the
  SQL registry (SQLAlchemy and `revreg.registry.service`) against `python -c pass`, and the
  interpreter's teardown after it (the same import ending in `os._exit(0)`, as
  `revreg.cli.main.skip_teardown` ends a push), as medians over interleaved triples;
- what a remote command imports (`--only http`): httpx as its package loads itself, httpx as
  `revreg.registry.httpx_client` loads it (without its command-line client), and the whole
  HTTP registry client, each less `python -c pass`, medians over interleaved rounds.

    python benchmarks/bench_startup.py [--pairs 7] [--versions 10000] [--only help,ls,verify,sql,http] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import workspace

BIN = Path(sys.executable).parent
REVREG = str(BIN / "revreg")


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def pairs(anchor: list[str], subject: list[str], n: int, env: dict[str, str]) -> dict:
    wall(anchor, env), wall(subject, env)  # warm the page cache and .pyc files
    a_s, s_s, ratios = [], [], []
    for _ in range(n):
        a = wall(anchor, env)
        s = wall(subject, env)
        a_s.append(a)
        s_s.append(s)
        ratios.append(s / a)
    return {
        "anchor_s": round(statistics.median(a_s), 4),
        "revreg_s": round(statistics.median(s_s), 4),
        "ratio_median": round(statistics.median(ratios), 2),
        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
    }


def bench_sql(env: dict[str, str], n: int) -> dict:
    bare = [sys.executable, "-c", "pass"]
    imported = [sys.executable, "-c", "import revreg.registry.service"]
    no_teardown = [sys.executable, "-c", "import os, revreg.registry.service; os._exit(0)"]
    for cmd in (bare, imported, no_teardown):
        wall(cmd, env)  # .pyc files and page cache
    rows = [(wall(bare, env), wall(imported, env), wall(no_teardown, env)) for _ in range(n)]
    med = statistics.median
    return {
        "python_s": round(med(r[0] for r in rows), 4),
        "import_sql_registry_s": round(med(r[2] - r[0] for r in rows), 4),
        "teardown_after_it_s": round(med(r[1] - r[2] for r in rows), 4),
    }


def bench_http(env: dict[str, str], n: int) -> dict:
    def imports(module: str) -> list[str]:
        return [sys.executable, "-c", f"import os, {module}; os._exit(0)"]

    cmds = {
        "python": [sys.executable, "-c", "import os; os._exit(0)"],
        "httpx": imports("httpx"),
        "httpx_without_cli": imports("revreg.registry.httpx_client"),
        "http_registry_client": imports("revreg.registry.remote"),
    }
    for cmd in cmds.values():
        wall(cmd, env)  # .pyc files and page cache
    rows = [{k: wall(cmd, env) for k, cmd in cmds.items()} for _ in range(n)]
    med = statistics.median
    return {"python_s": round(med(r["python"] for r in rows), 4)} | {
        f"import_{k}_s": round(med(r[k] - r["python"] for r in rows), 4) for k in cmds if k != "python"
    }


def bench_help(env: dict[str, str], n: int) -> dict:
    return pairs([sys.executable, "-c", "pass"], [REVREG, "--help"], n, env)


def bench_ls(out: Path, keys: Path, env: dict[str, str], versions: int, n: int) -> dict:
    from bench_registry import ls_registry

    reg = ls_registry(out, keys, env, versions)
    return {
        "versions": versions + 1,
        **pairs([sys.executable, "-c", "pass"], [REVREG, "ls", "--registry", str(reg)], n, env),
    }


ANCHOR = """
import sys, torch, transformers
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel
model = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
ids = load_file(sys.argv[2])["input_ids"]
with torch.inference_mode():
    for _ in range(8):  # 2 for the determinism check + 2 per cycle, 3 cycles
        for batch in ids.split(8):
            model(input_ids=batch).logits
"""


def bench_verify(out: Path, keys: Path, env: dict[str, str], n: int) -> dict:
    import torch
    from bench_verifier import gpt2, lora_behavior

    from revreg.artifacts.keys import Keyring
    from revreg.artifacts.probes import ProbeManifest, write_probes

    work = out / "verify-e2e"
    work.mkdir(exist_ok=True)
    model = gpt2(2, 128, 2)
    model.save_pretrained(work / "base")
    ring = Keyring(keys)
    art, _ = lora_behavior(work, ring, model)
    ids = torch.randint(0, 50257, (16, 32), generator=torch.Generator().manual_seed(2))
    manifest = ProbeManifest("bench", ("input_ids",), "logits", "kl", None, 8, 16)
    probes = work / "p.safetensors"
    write_probes(probes, {"input_ids": ("I64", (16, 32), ids.numpy().tobytes())}, manifest)
    # The verifier trusts the keyring's keys for a behavior file (the bench key signed it).
    verify_cmd = [REVREG, "verify", str(art), "--base", str(work / "base"), "--probes", str(probes)]
    anchor = [sys.executable, "-c", ANCHOR, str(work / "base"), str(probes)]
    result = pairs(anchor, verify_cmd, n, env)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom revreg.cli.main import cli\ntry:\n cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            " assert e.code == 0, e.code\nprint('torch._dynamo' in sys.modules, file=sys.stderr)",
            *verify_cmd[1:],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    result["dynamo_imported"] = probe.stderr.strip().splitlines()[-1] == "True"
    # transformers' own model code (masking_utils) imports torch._dynamo: the anchor pays it too.
    anchor_probe = subprocess.run(
        [*anchor[:2], ANCHOR + "print('torch._dynamo' in sys.modules, file=sys.stderr)", *anchor[3:]],
        capture_output=True,
        text=True,
        env=env,
    )
    result["dynamo_imported_by_anchor"] = anchor_probe.stderr.strip().splitlines()[-1] == "True"
    result["model"] = "GPT-2 2 layers x 128 (vocab 50257), LoRA r8 on 8 linears, 16 probes x 32 tokens, 3 cycles"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--versions", type=int, default=10000)
    parser.add_argument("--only", default="help,ls,verify,sql")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    out, keys, env = workspace(args.out)
    env = {**env, "OMP_NUM_THREADS": "1"}  # the same thread count for anchor and revreg
    parts = set(args.only.split(","))
    results: dict[str, object] = {}
    if "sql" in parts:
        results["sql"] = bench_sql(env, args.pairs)
        print("sql", json.dumps(results["sql"]), flush=True)
    if "http" in parts:
        results["http"] = bench_http(env, args.pairs)
        print("http", json.dumps(results["http"]), flush=True)
    if "help" in parts:
        results["help"] = bench_help(env, args.pairs)
        print("help", json.dumps(results["help"]), flush=True)
    if "ls" in parts:
        results["ls"] = bench_ls(out, keys, env, args.versions, args.pairs)
        print("ls", json.dumps(results["ls"]), flush=True)
    if "verify" in parts:
        results["verify"] = bench_verify(out, keys, env, args.pairs)
        print("verify", json.dumps(results["verify"]), flush=True)
    (out / "startup.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
