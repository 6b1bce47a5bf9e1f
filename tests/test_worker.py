"""Certification queue and workers on PostgreSQL: every request certified exactly once, none
lost when a worker is killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revreg.artifacts.keys import Keyring
from revreg.registry.queue import Queue
from revreg.registry.service import Registry
from tests.conftest import CREATED

REVREG = str(Path(sys.executable).parent / "revreg")
TOY = "revreg.verifier.toy:build"


@pytest.fixture
def queued(run, toy, keys_dir: Path, tmp_path: Path, pg_url: str) -> dict:
    """A PostgreSQL registry with `count` toy versions pushed and a certification queued for each."""
    count = 5
    env = {"REVREG_REGISTRY": pg_url}
    Keyring(keys_dir).generate("vera")
    for args in (
        ("init", "--store", tmp_path / "blobs"),
        ("keys", "trust", "alice", "--role", "publisher"),
        ("keys", "trust", "vera", "--role", "verifier"),
        ("probes", "push", toy["probes"]),
    ):
        assert run(*args, env=env).exit_code == 0, args
    spec = toy["artifact"].parent / "spec.json"
    for i in range(count):
        art = tmp_path / f"v{i}.safetensors"
        assert (
            run(
                "pack",
                "--tensors",
                toy["artifact"].parent / "t.safetensors",
                "--spec",
                spec,
                "--base",
                toy["base"],
                "--name",
                "toy",
                "--version",
                f"1.0.{i}",
                "--key",
                "alice",
                "--created",
                CREATED,
                "-o",
                art,
            ).exit_code
            == 0
        )
        assert run("push", art, env=env).exit_code == 0
        result = run(
            "certify",
            f"toy:1.0.{i}",
            "--queue",
            "--base",
            toy["base"],
            "--factory",
            TOY,
            "--probes",
            "toy-probes",
            env=env,
        )
        assert result.exit_code == 0 and "queued certification request" in result.stdout
    return {
        "url": pg_url,
        "count": count,
        "env": {**os.environ, "REVREG_KEYS": str(keys_dir), "REVREG_REGISTRY": pg_url},
    }


def _worker(queued: dict, name: str, lease: str = "30") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [REVREG, "worker", "--key", "vera", "--id", name, "--drain", "--lease", lease, "--poll", "0.2"],
        env=queued["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _exactly_once(url: str, count: int) -> None:
    reg = Registry.open(url)
    versions = reg.ls("toy")
    assert len(versions) == count and all(v.state == "certified" for v in versions)
    for v in versions:
        assert len(reg.show(f"toy:{v.version}").certifications) == 1, v.ref
    assert [r.state for r in Queue(reg).list()] == ["done"] * count
    assert reg.audit_verify().ok
    reg.engine.dispose()


@pytest.mark.slow
def test_several_workers_certify_every_request_exactly_once(queued):
    workers = [_worker(queued, f"w{i}") for i in range(3)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    claimed = sum(err.count("claimed request") for _, err in outputs)
    assert claimed == queued["count"]
    _exactly_once(queued["url"], queued["count"])


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(queued):
    reg = Registry.open(queued["url"])
    victim = _worker(queued, "victim", lease="3")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = [r for r in Queue(reg).list("running") if r.lease_owner == "victim"]
        if running:
            break
        time.sleep(0.02)
    assert running, "the victim never claimed a request"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    taken = running[0].id
    rescuer = _worker(queued, "rescuer", lease="3")
    _, err = rescuer.communicate(timeout=300)
    assert rescuer.returncode == 0, err
    request = next(r for r in Queue(reg).list() if r.id == taken)
    assert request.state == "done" and request.lease_owner == "rescuer" and request.attempts == 2
    reg.engine.dispose()
    _exactly_once(queued["url"], queued["count"])


def test_certify_needs_a_key_unless_queued(run, toy, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    run("init", env=env)
    result = run("certify", "toy:1.0.0", "--base", toy["base"], "--factory", TOY, "--probes", toy["probes"], env=env)
    assert result.exit_code == 2 and "certify needs --key" in result.stderr
