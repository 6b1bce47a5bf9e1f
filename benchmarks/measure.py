"""Wall time and peak RSS of one command, measured by GNU time so that the benchmark's own
memory (copied into a forked child until it execs) never counts."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

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


def quiet_disk() -> None:
    """Wait until the disk has written back what earlier steps left dirty (and the journal its
    deletions), so the next timed command, anchor or subject, starts on a quiet disk: a `dd`
    right after a 1 GiB push measured 1.8-2.7 s against 0.75 s on a quiet one."""
    import os

    os.sync()
    time.sleep(0.2)


def workspace(out: Path) -> tuple[Path, Path, dict[str, str]]:
    """The benchmark's output folder, its signing keyring (key `bench`), and the environment
    that points revreg at that keyring."""
    import os

    from revreg.artifacts.keys import Keyring

    out = out.absolute()
    out.mkdir(exist_ok=True)
    keys = out / "keys"
    if not (keys / "bench.key").exists():
        Keyring(keys).generate("bench")
    return out, keys, {**os.environ, "REVREG_KEYS": str(keys)}
