"""Wall time and peak RSS of one command, measured by GNU time so that the benchmark's own
memory (copied into a forked child until it execs) never counts."""

from __future__ import annotations

import shutil
import subprocess
import time

GNU_TIME = shutil.which("time") or "/usr/bin/time"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in bytes, exit code)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [GNU_TIME, "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    elapsed = time.perf_counter() - start
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    return elapsed, rss_kib * 1024, proc.returncode
