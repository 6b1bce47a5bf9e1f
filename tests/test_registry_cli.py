"""The registry through the real CLI: the whole lifecycle, JSON output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from revreg.artifacts.attestation import sign_certification
from revreg.artifacts.keys import Keyring
from revreg.registry.service import Registry
from tests.conftest import make_artifact, minimal_predicate
from tests.test_cli import _modules_after


def test_lifecycle_through_the_cli(run, keys_dir: Path, tmp_path: Path, artifact: Path, gpt2_dir: Path):
    reg_dir = tmp_path / "reg"
    env = {"REVREG_REGISTRY": str(reg_dir), "REVREG_ACTOR": "ci-bot"}

    def cli(*args):
        return run(*args, env=env)

    assert cli("init").exit_code == 0
    assert cli("keys", "trust", "alice", "--role", "publisher").exit_code == 0
    Keyring(keys_dir).generate("vera")
    assert cli("keys", "trust", "vera", "--role", "verifier").exit_code == 0
    assert "publisher" in cli("keys", "trusted").stdout
    result = cli("push", artifact)
    assert result.exit_code == 0 and "pushed demo:1.0.0 sha256:" in result.stdout
    assert "already present" in cli("push", artifact).stdout
    assert cli("base", "register", gpt2_dir, "--name", "tiny-gpt2").exit_code == 0

    listing = json.loads(cli("ls", "--json").stdout)
    assert [(v["name"], v["version"], v["state"]) for v in listing] == [("demo", "1.0.0", "pending")]
    assert "demo:1.0.0" in cli("ls").stdout

    refused = cli("publish", "demo:1.0.0")
    assert refused.exit_code == 2 and "only a certified version can be published" in refused.stderr
    reg = Registry.open(str(reg_dir), actor="ci-bot")
    info = reg.resolve("demo:1.0.0")
    reg.record_certification(
        "demo:1.0.0",
        sign_certification(info.ref, info.digest, minimal_predicate(info.digest), Keyring(keys_dir).signer("vera")),
    )
    assert cli("publish", "demo:1.0.0").exit_code == 0
    assert cli("tag", "demo:1.0.0", "latest").exit_code == 0

    shown = json.loads(cli("show", "demo", "--json").stdout)
    assert shown["info"]["state"] == "published" and shown["base_registered"] and shown["info"]["tags"] == ["latest"]
    assert [h["action"] for h in shown["history"]] == ["version.push", "version.certify", "version.publish"]
    assert all(h["actor"] == "ci-bot" for h in shown["history"])

    out = tmp_path / "pulled.safetensors"
    assert cli("pull", "demo", "-o", out).exit_code == 0 and out.read_bytes() == artifact.read_bytes()
    assert cli("pull", "demo:latest", "--format", "peft", "-o", tmp_path / "adapter").exit_code == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    assert cli("yank", "demo:1.0.0", "--reason", "regression in eval").exit_code == 0
    gone = cli("pull", "demo:1.0.0", "-o", tmp_path / "again.safetensors")
    assert gone.exit_code == 2 and "was yanked" in gone.stderr and "--allow-yanked" in gone.stderr

    assert "chain intact" in cli("audit", "verify").stdout
    assert "version.yank demo:1.0.0" in cli("audit", "log").stdout
    assert cli("fsck").exit_code == 0


def test_tampered_audit_log_fails_verify_with_exit_1(run, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    run("init", env=env)
    run("keys", "trust", "alice", "--role", "publisher", env=env)
    run("push", make_artifact(tmp_path / "a.safetensors", keys_dir), env=env)
    reg = Registry.open(str(tmp_path / "reg"))
    with reg.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_log SET details = '{}' WHERE seq = 3")
    result = run("audit", "verify", env=env)
    assert result.exit_code == 1 and "row 3 (version.push demo:1.0.0) was edited" in result.stderr


def test_tampered_blob_fails_fsck_with_exit_1(run, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    run("init", env=env)
    run("keys", "trust", "alice", "--role", "publisher", env=env)
    run("push", make_artifact(tmp_path / "a.safetensors", keys_dir), env=env)
    blob = next((tmp_path / "reg" / "blobs" / "sha256").glob("*/*"))
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    result = run("fsck", env=env)
    assert result.exit_code == 1 and "is corrupt" in result.stdout


def test_bad_reference_is_one_line_exit_2(run, tmp_path: Path):
    run("init", "--registry", tmp_path / "reg")
    for ref, fragment in [
        ("../x", "invalid behavior name"),
        ("a\x01b", "control characters"),
        ("demo@md5:abc", "is not a blob digest"),
        ("nope", "no behavior named 'nope'"),
    ]:
        result = run("show", ref, "--registry", tmp_path / "reg")
        assert result.exit_code == 2 and fragment in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_push_of_a_non_artifact_is_refused(run, tmp_path: Path):
    run("init", "--registry", tmp_path / "reg")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    result = run("push", tmp_path / "junk.safetensors", "--registry", tmp_path / "reg")
    assert result.exit_code == 2 and "truncated" in result.stderr
    assert list((tmp_path / "reg" / "blobs" / "tmp").iterdir()) == []


def test_ls_does_not_import_torch(run, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    run("init", env=env)
    run("keys", "trust", "alice", "--role", "publisher", env=env)
    run("push", make_artifact(tmp_path / "a.safetensors", keys_dir), env=env)
    code = (
        f"from revreg.cli.main import cli\ntry:\n cli.main(['ls', '--registry', {str(tmp_path / 'reg')!r}])\n"
        "except SystemExit as e:\n assert e.code == 0, e.code"
    )
    mods = _modules_after(code)
    assert "torch" not in mods and "revreg.registry.reader" in mods
    # An embedded registry is listed through sqlite3 alone: no SQLAlchemy, no cryptography.
    assert not {m for m in mods if m.split(".")[0] in ("sqlalchemy", "cryptography", "numpy")}
