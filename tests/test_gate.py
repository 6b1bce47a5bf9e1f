"""`revreg gate`: release policies over real certifications, with JUnit and GitHub outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from revreg.artifacts.keys import Keyring
from revreg.gate.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
TOY = "revreg.verifier.toy:build"

GOOD_POLICY = """
[policy]
publishers = ["alice"]
verifiers = ["vera"]
device = "cpu"
min_cycles = 3
bitwise = true
min_effect = 1e-6
probe_set = "toy-probes"
max_age = "1d"
no_revoked_keys = true
"""


@pytest.fixture
def certified(certified_toy: dict[str, str]) -> dict[str, str]:
    return certified_toy


def _policy(tmp_path: Path, text: str) -> Path:
    (tmp_path / "policy.toml").write_text(text)
    return tmp_path / "policy.toml"


def test_every_rule_holds_exit_0_with_junit(run, certified, tmp_path: Path):
    junit = tmp_path / "gate.xml"
    result = run("gate", "toy:1.0.0", "--policy", _policy(tmp_path, GOOD_POLICY), "--junit", junit, env=certified)
    assert result.exit_code == 0, result.output
    assert "gate passed for toy:1.0.0" in result.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    names = [case.get("name") for case in suite.findall("testcase")]
    assert names == [
        "certified",
        "publishers",
        "verifiers",
        "device",
        "min_cycles",
        "bitwise",
        "min_effect",
        "probe_set",
        "max_age",
        "no_revoked_keys",
    ]
    assert suite.get("failures") == "0" and suite.findall("testcase/failure") == []


def test_failing_rules_are_each_named_exit_1(run, certified, tmp_path: Path):
    policy = _policy(
        tmp_path,
        GOOD_POLICY.replace('device = "cpu"', 'device = "cuda"')
        .replace("min_cycles = 3", "min_cycles = 5")
        .replace('publishers = ["alice"]', 'publishers = ["release-bot"]'),
    )
    junit = tmp_path / "gate.xml"
    result = run("gate", "toy:1.0.0", "--policy", policy, "--junit", junit, "--json", env=certified)
    assert result.exit_code == 1
    assert result.stderr.strip() == "revreg: error: gate failed for toy:1.0.0: publishers, device, min_cycles"
    doc = json.loads(result.stdout)
    failed = {r["rule"]: r["message"] for r in doc["rules"] if not r["passed"]}
    assert failed["device"] == "certified on cpu (required: cuda)" and failed["min_cycles"] == "3 cycles (minimum 5)"
    failures = ET.parse(junit).getroot().findall("testsuite/testcase/failure")
    assert len(failures) == 3


def test_certification_age_is_checked(run, certified, tmp_path: Path):
    result = run(
        "gate", "toy:1.0.0", "--policy", _policy(tmp_path, GOOD_POLICY), "--at", "2099-01-01T00:00:00Z", env=certified
    )
    assert result.exit_code == 1 and "max_age" in result.stderr


def test_a_revoked_verifier_fails_no_revoked_keys(run, certified, tmp_path: Path):
    assert run("keys", "revoke", "vera", "--reason", "rotated", env=certified).exit_code == 0
    result = run("gate", "toy:1.0.0", "--policy", _policy(tmp_path, GOOD_POLICY), env=certified)
    assert result.exit_code == 1
    assert "FAIL  no_revoked_keys  revoked: vera" in result.stdout
    assert "FAIL  certified        toy:1.0.0 has no certification by a trusted, unrevoked verifier key" in result.stdout


def test_behavior_without_certification_fails_certified(run, toy, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    for args in (("init",), ("keys", "trust", "alice", "--role", "publisher"), ("push", toy["artifact"])):
        run(*args, env=env)
    result = run("gate", "toy:1.0.0", "--policy", _policy(tmp_path, "[policy]\nmin_cycles = 1\n"), env=env)
    assert result.exit_code == 1
    assert "FAIL  certified        toy:1.0.0 is pending; only a certified or published version passes" in result.stdout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[policy]\nmin_cycle = 3\n", "unknown rule 'min_cycle' (known: publishers"),
        ('[policy]\nmin_cycles = "3"\n', "policy rule min_cycles must be an integer, got str '3'"),
        ("[policy]\nbitwise = 1\n", "policy rule bitwise must be true or false, got int 1"),
        ('[policy]\nmax_age = "a week"\n', "max_age must look like 30d"),
        ('[policy]\nmax_age = "9999999999d"\n', "max_age '9999999999d' is too large"),
        ('[policy]\ndevice = "tpu"\n', "device must be cpu, cuda or any"),
        ("min_cycles = 3\n", "expected exactly one [policy] table"),
        ("[policy\n", "is not valid TOML"),
    ],
)
def test_bad_policy_is_one_line_exit_2(run, certified, tmp_path: Path, text: str, fragment: str):
    result = run("gate", "toy:1.0.0", "--policy", _policy(tmp_path, text), env=certified)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_github_actions_annotations_and_step_summary(run, certified, tmp_path: Path):
    summary = tmp_path / "summary.md"
    env = {**certified, "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    policy = _policy(tmp_path, GOOD_POLICY.replace('device = "cpu"', 'device = "cuda"'))
    result = run("gate", "toy:1.0.0", "--policy", policy, env=env)
    assert result.exit_code == 1
    assert "::error title=revreg gate toy:1.0.0: device::certified on cpu" in result.stdout
    assert "::notice title=revreg gate toy:1.0.0: bitwise::" in result.stdout
    text = summary.read_text()
    assert (
        "### revreg gate FAILED: `toy:1.0.0`" in text
        and "| ❌ | `device` | certified on cpu (required: cuda) |" in text
    )


def test_the_example_policy_parses():
    rules = [r.name for r in load_policy(ROOT / "examples" / "ci" / "policy.toml").rules]
    assert rules[0] == "certified" and "max_age" in rules and "no_revoked_keys" in rules


@pytest.mark.slow
def test_ci_example_script_runs_the_pipeline(toy, keys_dir: Path, tmp_path: Path):
    """The very script the GitHub Actions and GitLab examples call, on a local registry."""
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "REVREG_KEYS": str(keys_dir),
        "REVREG_REGISTRY": str(tmp_path / "reg"),
    }
    Keyring(keys_dir).generate("vera")
    for args in (
        ["init"],
        ["keys", "trust", "alice", "--role", "publisher"],
        ["keys", "trust", "vera", "--role", "verifier"],
        ["probes", "push", str(toy["probes"])],
    ):
        subprocess.run([str(bindir / "revreg"), *args], env=env, check=True, capture_output=True)
    env |= {
        "ARTIFACT": str(toy["artifact"]),
        "REF": "toy:1.0.0",
        "BASE": str(toy["base"]),
        "FACTORY": TOY,
        "PROBES": "toy-probes",
        "VERIFIER_KEY": "vera",
        "POLICY": str(_policy(tmp_path, GOOD_POLICY)),
        "REPORT_DIR": str(tmp_path / "reports"),
    }
    script = ROOT / "examples" / "ci" / "certify-and-gate.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gate passed for toy:1.0.0" in done.stdout
    assert ET.parse(tmp_path / "reports" / "revreg-gate.xml").getroot().get("failures") == "0"
    assert "<svg" in (tmp_path / "reports" / "audit-report.html").read_text()
    env["POLICY"] = str(_policy(tmp_path, GOOD_POLICY.replace('device = "cpu"', 'device = "cuda"')))
    failed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "gate failed for toy:1.0.0: device" in failed.stderr
