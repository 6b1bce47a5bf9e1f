"""Artifacts from earlier releases keep verifying, and the format stays byte-stable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from revreg.artifacts.artifact import load_artifact
from revreg.artifacts.keys import Keyring

GOLDEN = Path(__file__).parent / "data" / "golden"


def test_golden_v1_artifact_still_verifies():
    verified = load_artifact(GOLDEN / "golden-1.0.0.safetensors", Keyring(GOLDEN / "keys").trusted())
    assert (verified.manifest.name, verified.manifest.version) == ("golden", "1.0.0")
    assert verified.digest == "sha256:" + hashlib.sha256((GOLDEN / "golden-1.0.0.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("tensor_hash", "golden"), [("sha256", "golden-1.0.0.safetensors"), ("blake3", "golden-blake3-1.0.0.safetensors")]
)
def test_packing_the_golden_inputs_gives_the_golden_bytes(tmp_path: Path, tensor_hash: str, golden: str):
    from click.testing import CliRunner

    from revreg.cli.main import cli

    out = tmp_path / "again.safetensors"
    result = CliRunner().invoke(
        cli,
        [
            "pack",
            "--tensors",
            str(GOLDEN / "tensors.safetensors"),
            "--spec",
            str(GOLDEN / "spec.json"),
            "--base",
            "sha256:" + "ab" * 32,
            "--name",
            "golden",
            "--version",
            "1.0.0",
            "--key",
            "golden-test-key",
            "--created",
            "2026-11-29T00:00:00Z",
            "--tensor-hash",
            tensor_hash,
            "--keys-dir",
            str(GOLDEN / "keys"),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (GOLDEN / golden).read_bytes()
    assert load_artifact(out, Keyring(GOLDEN / "keys").trusted()).manifest.tensors_digest.startswith(tensor_hash + ":")


def _golden_certification(divergence: str):
    from revreg.artifacts.attestation import verify_certification

    envelope = (GOLDEN / f"certification-v1-{divergence}.json").read_bytes()
    return verify_certification(envelope, Keyring(GOLDEN / "keys").trusted())


def test_v1_certifications_still_verify_and_name_their_artifact():
    artifact = GOLDEN / "certified-toy-1.0.0.safetensors"
    digest = "sha256:" + hashlib.sha256(artifact.read_bytes()).hexdigest()
    for divergence in ("kl", "mse"):
        cert = _golden_certification(divergence)
        assert cert.passed and cert.subject_digest == digest and cert.subject_name == "toy:1.0.0"
        assert "schema_version" not in cert.predicate  # schema 1 had none


def test_v1_metrics_are_read_under_their_divergence_names():
    from revreg.artifacts.predicate import metric

    kl = _golden_certification("kl").predicate["metrics"]
    mse = _golden_certification("mse").predicate["metrics"]
    assert metric(kl, "adapted") == ("kl", kl["kl_adapted"])
    assert metric(kl, "adapted", secondary=True) == ("js", kl["js_adapted"])
    # schema 1 stored an mse probe set's MSE and cosine distance as kl_*/js_*
    assert metric(mse, "adapted") == ("mse", mse["kl_adapted"])
    assert metric(mse, "adapted", secondary=True) == ("cosine", mse["js_adapted"])


def test_gate_min_effect_reads_v1_certifications():
    from datetime import UTC, datetime

    from revreg.gate.policy import CertificationEvidence, Evidence, KeyFacts, _min_effect

    for divergence in ("kl", "mse"):
        cert = _golden_certification(divergence)
        key = KeyFacts(cert.verifier.keyid, cert.verifier.name, False)
        now = datetime(2026, 12, 2, tzinfo=UTC)
        evidence = Evidence(
            "toy:1.0.0", cert.subject_digest, "certified", key, CertificationEvidence(cert.predicate, key, now), now
        )
        result = _min_effect(1e-3).verify(evidence)
        assert result.passed and result.message.startswith(f"{divergence} while attached"), result.message
