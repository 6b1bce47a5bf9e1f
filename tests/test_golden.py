"""Artifacts from earlier releases keep verifying, and the format stays byte-stable."""

from __future__ import annotations

import hashlib
from pathlib import Path

from revreg.artifacts.artifact import load_artifact
from revreg.artifacts.keys import Keyring

GOLDEN = Path(__file__).parent / "data" / "golden"


def test_golden_v1_artifact_still_verifies():
    verified = load_artifact(GOLDEN / "golden-1.0.0.safetensors", Keyring(GOLDEN / "keys").trusted())
    assert (verified.manifest.name, verified.manifest.version) == ("golden", "1.0.0")
    assert verified.digest == "sha256:" + hashlib.sha256((GOLDEN / "golden-1.0.0.safetensors").read_bytes()).hexdigest()


def test_packing_the_golden_inputs_gives_the_golden_bytes(tmp_path: Path):
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
            "--keys-dir",
            str(GOLDEN / "keys"),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (GOLDEN / "golden-1.0.0.safetensors").read_bytes()
