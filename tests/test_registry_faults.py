"""Faults: pushes killed at random moments, and racing pushers, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revreg.registry.service import ConflictError, Registry
from tests.conftest import make_artifact

REVREG = str(Path(sys.executable).parent / "revreg")


def _push_cmd(location: str, path: Path) -> list[str]:
    return [REVREG, "push", str(path), "--registry", location]


@pytest.mark.slow
def test_push_killed_at_any_moment_leaves_a_consistent_registry(
    registry: Registry, registry_location, keys_dir: Path, tmp_path: Path
):
    location, _ = registry_location
    env = {**os.environ, "REVREG_KEYS": str(keys_dir)}
    arts = [make_artifact(tmp_path / f"{i}.safetensors", keys_dir, f"1.0.{i}", seed=i, size=4 << 20) for i in range(13)]
    start = time.perf_counter()
    subprocess.run(_push_cmd(location, arts[0]), check=True, env=env, capture_output=True)
    full = time.perf_counter() - start
    rng = random.Random(1234)
    killed = 0
    for art in arts[1:]:
        proc = subprocess.Popen(_push_cmd(location, art), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.1) * full)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        report = registry.fsck()
        assert report.problems == (), (art.name, report.problems)
        assert registry.audit_verify().ok
    assert killed >= 4  # most pushes die mid-way; a few finish before their kill lands
    # Every interrupted push succeeds when repeated, and afterwards nothing is left over.
    for art in arts:
        registry.push(art)
    assert sorted(v.version for v in registry.ls()) == sorted(f"1.0.{i}" for i in range(13))
    # The killed writers hold no lock any more: their leftovers are provably abandoned.
    assert registry.fsck(prune=True, grace=0).problems == () and registry.fsck().warnings == ()


def _racer(location: str, keys_dir: str, path: str, barrier, results) -> None:
    os.environ["REVREG_KEYS"] = keys_dir
    reg = Registry.open(location)
    barrier.wait()
    try:
        reg.push(Path(path))
        results.put("won")
    except ConflictError as exc:
        results.put(f"conflict: {exc}")
    except Exception as exc:  # reported to the test, which fails on anything but won/conflict
        results.put(f"error: {exc!r}")


@pytest.mark.parametrize("racers", [6])
def test_racing_pushers_of_one_version_with_different_bytes_exactly_one_wins(
    registry: Registry, registry_location, keys_dir: Path, tmp_path: Path, racers: int
):
    location, _ = registry_location
    paths = [make_artifact(tmp_path / f"r{i}.safetensors", keys_dir, seed=i) for i in range(racers)]
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(location, str(keys_dir), str(p), barrier, results)) for p in paths]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes.count("won") == 1, outcomes
    assert all(o.startswith("conflict: demo:1.0.0") for o in outcomes if o != "won"), outcomes
    assert len(registry.ls()) == 1 and registry.audit_verify().ok
    assert registry.fsck().problems == ()


def _pusher(location: str, paths: list[str], acknowledged) -> None:
    reg = Registry.open(location)
    for path in paths:
        try:
            reg.push(Path(path))
            acknowledged.put(path)
        except Exception as exc:
            acknowledged.put(f"error: {exc!r}")
    reg.engine.dispose()


def _pruner(location: str, stop) -> None:
    reg = Registry.open(location)
    while not stop.is_set():
        reg.fsck(prune=True, grace=0)  # no grace at all: only the writers' locks protect them
    reg.engine.dispose()


@pytest.mark.slow
def test_fsck_prune_beside_pushes_loses_no_acknowledged_version(
    registry: Registry, registry_location, keys_dir: Path, tmp_path: Path
):
    """The review's torture: pushes and `fsck --prune` side by side. Every push that was
    acknowledged must pull afterwards, with its blob intact."""
    location, _ = registry_location
    writers, per_writer = 3, 12
    paths = [
        [
            str(make_artifact(tmp_path / f"w{w}-{i}.safetensors", keys_dir, f"1.{w}.{i}", seed=w * 100 + i, size=4096))
            for i in range(per_writer)
        ]
        for w in range(writers)
    ]
    ctx = multiprocessing.get_context("fork")
    acknowledged, stop = ctx.Queue(), ctx.Event()
    pruners = [ctx.Process(target=_pruner, args=(location, stop)) for _ in range(2)]
    pushers = [ctx.Process(target=_pusher, args=(location, p, acknowledged)) for p in paths]
    for proc in pruners + pushers:
        proc.start()
    results = [acknowledged.get(timeout=300) for _ in range(writers * per_writer)]
    stop.set()
    for proc in pruners + pushers:
        proc.join(timeout=120)
    assert [r for r in results if r.startswith("error")] == []
    assert registry.fsck().problems == ()
    for path in results:
        version = Path(path).stem.split("-")[0][1:]  # w{w}-{i} -> 1.{w}.{i}
        ref = f"demo:1.{version}.{Path(path).stem.split('-')[1]}"
        out = tmp_path / "pulled.safetensors"
        registry.pull(ref, out, allow_unpublished=True)
        assert out.read_bytes() == Path(path).read_bytes()
        out.unlink()
