"""`revreg audit report`: self-contained HTML rendered by a real browser, Markdown, JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from revreg.registry.service import Registry
from tests.conftest import cli_steps

TOY = "revreg.verifier.toy:build"
PINNED = "2026-11-29T00:00:00Z"


@pytest.fixture
def registry_env(run, certified_toy: dict[str, str]) -> dict[str, str]:
    """toy:1.0.0 certified with a merge baseline, then published."""
    cli_steps(run, certified_toy, ("publish", "toy:1.0.0"))
    return certified_toy


def test_report_formats_hold_the_evidence(run, registry_env, tmp_path: Path):
    for ext in ("html", "md", "json"):
        result = run("audit", "report", "-o", tmp_path / f"r.{ext}", "--generated-at", PINNED, env=registry_env)
        assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    (version,) = doc["behaviors"][0]["versions"]
    (cert,) = version["certifications"]
    assert cert["verified"] and cert["verdict"] == "PASS" and cert["rf"] == 1.0 and cert["cycles"] == 3
    assert cert["bitwise"] == {"identity": True, "state": True, "outputs": True}
    assert cert["baselines"][0]["baseline"] == "merge" and cert["baselines"][0]["kl_reset"] > 0
    assert [e["action"] for e in version["timeline"]] == ["version.push", "version.certify", "version.publish"]
    assert doc["audit_chain"]["ok"] and doc["summary"]["states"] == {"published": 1}
    md = (tmp_path / "r.md").read_text()
    assert "### toy:1.0.0 (published)" in md and "certification **PASS** by vera on cpu" in md
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") == 2 and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in html and "<link" not in html and "@media print" in html


def test_same_state_gives_the_same_bytes(run, registry_env, tmp_path: Path):
    for name in ("a", "b"):
        run("audit", "report", "-o", tmp_path / f"{name}.html", "--generated-at", PINNED, env=registry_env)
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


def test_tampered_audit_log_is_reported_and_exits_1(run, registry_env, tmp_path: Path):
    reg = Registry.open(registry_env["REVREG_REGISTRY"])
    with reg.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_log SET actor = 'mallory' WHERE seq = 5")
    result = run("audit", "report", "-o", tmp_path / "r.html", env=registry_env)
    assert result.exit_code == 1 and "audit log broken: row 5" in result.stderr
    assert "BROKEN" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--behavior", "nope", "-o", "r.html"], "no behavior named 'nope'"),
        (["-o", "r.pdf"], "the report format follows the extension"),
    ],
)
def test_bad_report_requests_exit_2(run, registry_env, tmp_path: Path, args: list[str], fragment: str):
    result = run("audit", "report", *[str(tmp_path / a) if a.startswith("r.") else a for a in args], env=registry_env)
    assert result.exit_code == 2 and fragment in result.stderr


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("chromium is not installed (make test installs it)")
    return found


def _headless(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Flags as this machine needs them: no sandbox as root, no network, a fresh profile.
    base = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)


def test_html_report_renders_charts_and_tables_in_chromium(run, registry_env, tmp_path: Path):
    from PIL import Image

    chromium = _chromium()
    page = tmp_path / "report.html"
    assert run("audit", "report", "-o", page, "--generated-at", PINNED, env=registry_env).exit_code == 0
    dom = _headless(chromium, tmp_path, "--dump-dom", page.as_uri()).stdout
    assert dom.count("<svg") == 2 and dom.count('class="bar"') >= 10 and dom.count("<table>") >= 6
    shot = tmp_path / "report.png"
    _headless(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1100, 2400)
    colors = image.getcolors(maxcolors=1 << 20)
    counts = {rgb: n for n, rgb in colors}
    # The mutation baseline's bars are drawn in #c05621 and table headers on #f7fafc.
    assert counts.get((0xC0, 0x56, 0x21), 0) > 200, "the charts did not render"
    assert counts.get((0xF7, 0xFA, 0xFC), 0) > 2000, "the tables did not render"
