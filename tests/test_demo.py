"""The README's main command: `revreg demo` tells the whole story and leaves its files."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from revreg.cli.main import cli
from revreg.registry.service import Registry


def test_demo_runs_end_to_end_on_an_embedded_registry(tmp_path: Path):
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "(the same from the file and from the live module)" in out
    assert "pushing the same bytes again is a no-op: ok" in out
    assert "refused:" in out and "tensor bytes do not match the signed manifest" in out
    assert "identical: True" in out
    assert "audit chain: intact" in out and "fsck: 0 problems" in out
    registry = Registry.open(str(tmp_path / "demo" / "registry"))
    assert [v.ref for v in registry.ls()] == ["demo-behavior:1.0.0"]
