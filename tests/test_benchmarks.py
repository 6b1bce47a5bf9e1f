"""The benchmarks that docs/performance.md quotes must run: each here on tiny inputs (a few MiB,
one or two pairs), checking that it finishes and reports what the docs read from it. This
measures nothing: a benchmark that broke when the code under it changed fails here, not when
someone next tries to re-run a figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

CASES = {
    "pipeline": (
        ["bench_pipeline.py", "--gib", "0.02", "--repeat", "1"],
        "pipeline.json",
        ["read_16_bytes_off_vs_aligned", "durable_one_pass_s", "stored_push_pass_s"],
    ),
    "allocator": (
        ["bench_pipeline.py", "--only", "allocator", "--gib", "0.02", "--repeat", "1"],
        "allocator.json",
        ["allocator_server_cpu_s_per_gib", "allocator_default_over_tuned"],
    ),
    "pushpull": (
        ["bench_registry.py", "--only", "pushpull", "--gib", "0.02", "--repeat", "2"],
        "registry.json",
        ["push_pull"],
    ),
    "transfer": (
        ["bench_server.py", "--only", "transfer", "--gib", "0.02", "--repeat", "2"],
        "server.json",
        ["transfer"],
    ),
    "startup": (
        ["bench_startup.py", "--only", "help,ls,sql,http", "--pairs", "1", "--versions", "20"],
        "startup.json",
        [],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_benchmark_runs(case: str, tmp_path: Path):
    args, report, keys = CASES[case]
    out = tmp_path / "bench-out"
    result = subprocess.run(
        [sys.executable, str(BENCH / args[0]), *args[1:], "--out", str(out)],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in out.glob("*.json"))
    assert report in written, written
    doc = json.loads((out / report).read_text())
    for key in keys:
        assert key in doc, sorted(doc)
