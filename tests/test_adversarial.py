"""Adversarial checks: a tamper matrix over every region of an artifact at every entry point,
downgrades, path traversal, racing writers of every kind, and killed publishes/certifications."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revreg.artifacts.artifact import load_artifact, read_tensors
from revreg.artifacts.attestation import sign_certification
from revreg.artifacts.keys import Keyring
from revreg.artifacts.safetensors_io import read_header, write_safetensors
from revreg.errors import InputError, RevregError
from revreg.registry.service import Registry, StateError
from tests.conftest import make_artifact, minimal_predicate

REVREG = str(Path(sys.executable).parent / "revreg")


def _regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of an artifact: length prefix, tensor entries, manifest, signature, each tensor."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    meta = read_header(path).metadata
    regions = {"length prefix": (0, 8)}
    for key, label in (("revreg.manifest", "manifest"), ("revreg.signature", "signature")):
        encoded = json.dumps(meta[key], ensure_ascii=False)[1:-1].encode()
        start = header.index(encoded) + 8
        regions[label] = (start, start + len(encoded))
    entries = header.index(b'"data_offsets"') + 8
    regions["tensor entries"] = (entries, entries + 40)
    for t in read_header(path).tensors:
        regions[f"tensor {t.name}"] = (8 + n + t.start, 8 + n + t.end)
    return regions


def _flip(data: bytes, start: int, end: int) -> bytes:
    out = bytearray(data)
    out[(start + end) // 2] ^= 0x04
    return bytes(out)


def test_tamper_matrix_every_region_every_entry_point(artifact: Path, keys_dir: Path, tmp_path: Path):
    """One flipped bit in each region is refused by inspect, push, pull (stored blob) and verify."""
    from revreg.verifier.engine import load_behavior

    trusted = Keyring(keys_dir).trusted()
    reg = Registry.init(str(tmp_path / "reg"), actor="adversary")
    reg.trust_key(Keyring(keys_dir).public_pem("alice"), "alice", "publisher")
    clean = reg.push(artifact).version
    blob = reg.store.path(clean.digest)
    original = artifact.read_bytes()
    cases = refused = 0
    for region, (start, end) in _regions(artifact).items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(_flip(original, start, end))
        entry_points = {
            "inspect": lambda bad=bad: load_artifact(bad, trusted),
            "push": lambda bad=bad: reg.push(bad),
            "verify": lambda bad=bad: load_behavior(bad, trusted),
        }
        for name, attempt in entry_points.items():
            cases += 1
            with pytest.raises(RevregError):
                attempt()
                pytest.fail(f"{region}: {name} accepted a tampered artifact")
            refused += 1
        blob.chmod(0o644)
        blob.write_bytes(_flip(original, start, end))
        cases += 1
        with pytest.raises(RevregError):
            reg.pull("demo:1.0.0", tmp_path / "out.safetensors", allow_unpublished=True)
        refused += 1
        assert not (tmp_path / "out.safetensors").exists()
        blob.write_bytes(original)
    assert [v.digest for v in reg.ls()] == [clean.digest]
    assert refused == cases >= 4 * 18


def test_signature_swapped_from_another_artifact_is_refused(keys_dir: Path, tmp_path: Path):
    a = make_artifact(tmp_path / "a.safetensors", keys_dir, "1", seed=1)
    b = make_artifact(tmp_path / "b.safetensors", keys_dir, "1", seed=2)
    metadata = dict(read_header(a).metadata)
    metadata["revreg.signature"] = read_header(b).metadata["revreg.signature"]
    write_safetensors(tmp_path / "swapped.safetensors", read_tensors(a), metadata)
    with pytest.raises(RevregError, match="covers a different manifest"):
        load_artifact(tmp_path / "swapped.safetensors", Keyring(keys_dir).trusted())


def test_attestation_of_another_version_is_refused(registry: Registry, keys_dir: Path, tmp_path: Path):
    one = registry.push(make_artifact(tmp_path / "1.safetensors", keys_dir, "1", seed=1)).version
    registry.push(make_artifact(tmp_path / "2.safetensors", keys_dir, "2", seed=2))
    envelope = sign_certification(one.ref, one.digest, minimal_predicate(one.digest), Keyring(keys_dir).signer("vera"))
    with pytest.raises(RevregError, match="the certification is about"):
        registry.record_certification("demo:2", envelope)
    assert registry.resolve("demo:2").state == "pending"


def test_downgrading_a_tag_needs_an_explicit_allowance(registry: Registry, keys_dir: Path, tmp_path: Path):
    for v in ("1", "2"):
        registry.push(make_artifact(tmp_path / f"{v}.safetensors", keys_dir, v, seed=int(v)))
    registry.tag("demo:2", "latest")
    with pytest.raises(StateError, match="from 2 back to the older 1 is a downgrade"):
        registry.tag("demo:1", "latest")
    assert registry.resolve("demo:latest").version == "2"
    registry.tag("demo:1", "latest", allow_downgrade=True)
    assert registry.resolve("demo:latest").version == "1"
    assert registry.audit_log("demo:latest")[-1].details["downgrade_allowed"] is True


def test_peft_tensor_names_cannot_traverse_paths(run, peft_dir: Path, tmp_path: Path):
    evil = tmp_path / "evil"
    shutil.copytree(peft_dir, evil)
    tensors = read_tensors(evil / "adapter_model.safetensors")
    target = "transformer.h.0.attn.c_attn"
    for name in [n for n in tensors if f".{target}.lora_" in n]:
        tensors[name.replace("transformer.", "../../etc/")] = tensors.pop(name)
    write_safetensors(evil / "adapter_model.safetensors", tensors, {"format": "pt"})
    result = run(
        "pack",
        "--peft",
        evil,
        "--base",
        "sha256:" + "0" * 64,
        "--name",
        "x",
        "--version",
        "1",
        "--key",
        "alice",
        "-o",
        tmp_path / "x.safetensors",
    )
    assert result.exit_code == 2 and "is not a module path" in result.stderr


def _torture(location: str, keys_dir: str, worker: int, seconds: float, out) -> None:
    """Random pushes, certifications, tags, publishes and yanks; reports what was acknowledged."""
    reg = Registry.open(location, actor=f"torture-{worker}")
    ring = Keyring(Path(keys_dir))
    rng = random.Random(worker)
    acked: list[tuple[str, str, str]] = []
    tmp = Path(keys_dir).parent / f"torture-{worker}"
    tmp.mkdir(exist_ok=True)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            versions = reg.ls()
            action = rng.choice(["push", "push", "certify", "publish", "tag", "yank"])
            if action == "push" or not versions:
                version = f"{worker}.{n}"
                reg.push(make_artifact(tmp / f"{n}.safetensors", Path(keys_dir), version, seed=worker * 1000 + n))
                acked.append(("push", f"demo:{version}", ""))
                continue
            v = rng.choice(versions)
            if action == "certify":
                reg.record_certification(
                    v.ref, sign_certification(v.ref, v.digest, minimal_predicate(v.digest), ring.signer("vera"))
                )
                acked.append(("certify", v.ref, ""))
            elif action == "publish":
                reg.publish(v.ref)
                acked.append(("publish", v.ref, ""))
            elif action == "tag":
                tag = rng.choice(["latest", "stable", "canary"])
                reg.tag(v.ref, tag, allow_downgrade=True)
                acked.append(("tag", v.ref, tag))
            else:
                reg.yank(v.ref, "torture")
                acked.append(("yank", v.ref, ""))
        except RevregError:
            continue  # lifecycle refusals and conflicts are expected; errors of other kinds are not
    out.put((worker, acked))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [5])
def test_concurrent_mixed_writers_keep_the_chain_and_every_acknowledged_write(
    registry: Registry, registry_location, keys_dir: Path, workers: int
):
    location, _ = registry_location
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_torture, args=(location, str(keys_dir), w, 8.0, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    verdict = registry.audit_verify()
    assert verdict.ok, verdict.problem
    states = {v.ref: v.state for v in registry.ls()}
    log = [(e.action, e.subject) for e in registry.audit_log()]
    acked = [a for acks in results.values() for a in acks]
    assert len(acked) >= 20
    for action, ref, _ in acked:
        assert ref in states, (action, ref)
        if action == "yank":
            assert states[ref] == "yanked"
        if action == "publish":
            assert states[ref] in ("published", "yanked")
        expected = {
            "push": "version.push",
            "certify": "version.certify",
            "publish": "version.publish",
            "yank": "version.yank",
        }.get(action)
        if expected:
            assert (expected, ref) in log
    assert registry.fsck().problems == ()


def _kill_at_random(cmd: list[str], env: dict[str, str], full: float, rng: random.Random) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.3, 1.1) * full)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_publish_and_certify_leave_a_consistent_registry(
    run, toy, registry: Registry, registry_location, keys_dir: Path, tmp_path: Path
):
    location, _ = registry_location
    env = {**os.environ, "REVREG_KEYS": str(keys_dir), "REVREG_REGISTRY": location}
    registry.push(toy["artifact"])
    certify = [
        REVREG,
        "certify",
        "toy:1.0.0",
        "--base",
        str(toy["base"]),
        "--factory",
        "revreg.verifier.toy:build",
        "--probes",
        str(toy["probes"]),
        "--key",
        "vera",
    ]
    rng = random.Random(7)
    start = time.perf_counter()
    subprocess.run([REVREG, "verify", str(toy["artifact"]), *certify[4:-2]], env=env, capture_output=True)
    full = time.perf_counter() - start
    for _ in range(4):
        _kill_at_random(certify, env, full, rng)
        assert registry.fsck().problems == () and registry.audit_verify().ok
        state = registry.resolve("toy:1.0.0").state
        assert state in ("pending", "certified")
        certs = registry.show("toy:1.0.0").certifications
        assert (state == "certified") == bool(certs)
    assert subprocess.run(certify, env=env, capture_output=True).returncode == 0
    for _ in range(4):
        _kill_at_random([REVREG, "publish", "toy:1.0.0"], env, 1.0, rng)
        assert registry.audit_verify().ok
        assert registry.resolve("toy:1.0.0").state in ("certified", "published")
    if registry.resolve("toy:1.0.0").state == "certified":
        assert subprocess.run([REVREG, "publish", "toy:1.0.0"], env=env, capture_output=True).returncode == 0
    assert registry.resolve("toy:1.0.0").state == "published"


def test_names_with_traversal_are_refused_everywhere(registry: Registry):
    for bad in ("../x", "a/b", "..", "x\\y", "/abs"):
        with pytest.raises(InputError):
            registry.resolve(bad)
