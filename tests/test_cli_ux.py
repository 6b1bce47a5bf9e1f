"""The CLI a platform engineer expects, through the real CLI: one exit-code table, --json on
every command that changes something (in the API's shapes), no silent overwrite, scopes a team
configures working end to end, policies in any editor's encoding, profiles and login."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from revreg.artifacts.attestation import sign_certification
from revreg.artifacts.keys import Keyring
from revreg.registry.api import to_json
from revreg.registry.service import Registry
from revreg.registry.tokens import Tokens
from tests.conftest import make_artifact, minimal_predicate
from tests.server_helpers import free_port, running

REVREG = str(Path(sys.executable).parent / "revreg")


@pytest.fixture
def reg(tmp_path: Path, keys_dir: Path):
    Keyring(keys_dir).generate("vera")
    registry = Registry.init(str(tmp_path / "reg"), actor="tester")
    ring = Keyring(keys_dir)
    registry.trust_key(ring.public_pem("alice"), "alice", "publisher")
    registry.trust_key(ring.public_pem("vera"), "vera", "verifier")
    yield registry
    registry.engine.dispose()


def _certify(reg: Registry, keys_dir: Path, ref: str) -> None:
    info = reg.resolve(ref)
    envelope = sign_certification(
        info.ref, info.digest, minimal_predicate(info.digest), Keyring(keys_dir).signer("vera")
    )
    reg.record_certification(info.pinned, envelope)


# -- one exit-code table -------------------------------------------------------------------------
def test_help_states_the_exit_codes(run):
    out = run("--help").stdout
    for line in ("0  success", "1  a check ran and failed", "2  bad input or usage", "3  the registry or server"):
        assert line in out


def test_a_failed_signature_or_digest_check_exits_1(run, reg: Registry, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": reg.describe()}
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    tampered = tmp_path / "t.safetensors"
    data = bytearray(art.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    assert run("inspect", tampered).exit_code == 1
    assert run("push", tampered, env=env).exit_code == 1
    assert run("push", art, env=env).exit_code == 0
    blob = reg.store.path(reg.resolve("demo:1.0.0").digest)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\1")
    assert run("pull", "demo:1.0.0", "-o", tmp_path / "o.safetensors", "--allow-unpublished", env=env).exit_code == 1
    assert run("fsck", env=env).exit_code == 1
    reg.revoke_key("alice", "left")
    other = make_artifact(tmp_path / "b.safetensors", keys_dir, "2.0.0", seed=3)
    assert run("push", other, env=env).exit_code == 1


def test_an_unreachable_registry_exits_3(run, tmp_path: Path):
    closed = f"http://127.0.0.1:{free_port()}"
    result = run("ls", "--registry", closed, env={"REVREG_TOKEN": "rvr_x"})
    assert result.exit_code == 3 and "cannot reach the registry" in result.stderr
    pg = run("ls", "--registry", "postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert pg.exit_code == 3 and "cannot reach the registry database" in pg.stderr
    assert run("ls", "--registry", "ftp://x").exit_code == 2


def test_serve_on_a_busy_port_refuses_before_announcing(reg: Registry, tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [REVREG, "serve", "--registry", reg.describe(), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr and "serving" not in proc.stderr


# -- --json on commands that change something --------------------------------------------------
def test_mutating_commands_print_the_api_shape_with_json(run, reg: Registry, keys_dir: Path, tmp_path: Path, toy):
    env = {"REVREG_REGISTRY": reg.describe()}
    packed = json.loads(
        run(
            "pack", "--tensors", toy["artifact"].parent / "t.safetensors",
            "--spec", toy["artifact"].parent / "spec.json", "--base", toy["base"],
            "--name", "toy", "--version", "1.0.0", "--key", "alice", "--created", "2026-01-01T00:00:00Z",
            "-o", tmp_path / "toy.safetensors", "--json",
        ).stdout
    )  # fmt: skip
    assert packed["manifest"]["name"] == "toy" and packed["digest"].startswith("sha256:")
    (pushed,) = json.loads(run("push", tmp_path / "toy.safetensors", "--json", env=env).stdout)
    assert pushed == {"version": to_json(reg.resolve("toy:1.0.0")), "created": True}
    probes = json.loads(run("probes", "push", toy["probes"], "--json", env=env).stdout)
    assert probes["created"] and probes["probes"]["name"] == "toy-probes"
    queued = json.loads(
        run(
            "certify", "toy:1.0.0", "--queue", "--base", toy["base"], "--probes", "toy-probes", "--json", env=env
        ).stdout
    )
    assert queued["ref"] == pushed["version"]["name"] + "@" + pushed["version"]["digest"]
    _certify(reg, keys_dir, "toy:1.0.0")
    assert json.loads(run("publish", "toy:1.0.0", "--json", env=env).stdout) == to_json(reg.resolve("toy:1.0.0"))
    assert json.loads(run("tag", "toy:1.0.0", "stable", "--json", env=env).stdout)["tags"] == ["stable"]
    out = tmp_path / "pulled.safetensors"
    pulled = json.loads(run("pull", "toy:stable", "-o", out, "--json", env=env).stdout)
    assert pulled["version"]["digest"] == pushed["version"]["digest"] and pulled["output"] == str(out)
    assert json.loads(run("yank", "toy:1.0.0", "--reason", "x", "--json", env=env).stdout)["state"] == "yanked"


def test_pull_never_overwrites_unless_forced(run, reg: Registry, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": reg.describe()}
    reg.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = run("pull", "demo:1.0.0", "-o", notes, "--allow-unpublished", env=env)
    assert result.exit_code == 2 and "already exists" in result.stderr and notes.read_text() == "mine"
    assert run("pull", "demo:1.0.0", "-o", notes, "--allow-unpublished", "--force", env=env).exit_code == 0
    assert notes.read_bytes() == (tmp_path / "a.safetensors").read_bytes()


# -- scopes a team configures ------------------------------------------------------------------
def test_a_namespace_token_pulls_gates_and_pushes_probes_in_its_namespace(run, reg, keys_dir, tmp_path, toy):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir, name="team-a.tone")
    reg.push(art)
    _certify(reg, keys_dir, "team-a.tone:1.0.0")
    reg.publish("team-a.tone:1.0.0")
    tokens = Tokens(reg)
    reader = tokens.create("team-a-read", ["read:team-a"])[0]
    pusher = tokens.create("team-a-push", ["push:team-a"])[0]
    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\nverifiers = ["vera"]\n')
    with running(reg) as url:
        env = {"REVREG_REGISTRY": url, "REVREG_TOKEN": reader + "\n"}  # a trailing newline, as `cat` gives
        assert run("pull", "team-a.tone:1.0.0", "-o", tmp_path / "o.safetensors", env=env).exit_code == 0
        assert run("gate", "team-a.tone:1.0.0", "--policy", policy, env=env).exit_code == 0
        pushed = run("probes", "push", toy["probes"], env={"REVREG_REGISTRY": url, "REVREG_TOKEN": pusher})
        assert pushed.exit_code == 0, pushed.output
        bad = run("ls", env={"REVREG_REGISTRY": url, "REVREG_TOKEN": "rvr_é-token"})
        assert bad.exit_code == 2 and "rvr_" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# -- policies ----------------------------------------------------------------------------------
@pytest.fixture
def gated(run, reg: Registry, keys_dir: Path, tmp_path: Path) -> dict[str, str]:
    reg.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    _certify(reg, keys_dir, "demo:1.0.0")
    return {"REVREG_REGISTRY": reg.describe()}


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_policies_with_a_bom_are_read(run, gated, tmp_path: Path, encoding: str):
    policy = tmp_path / "p.toml"
    policy.write_bytes('[policy]\nverifiers = ["vera"]\n'.encode(encoding))
    assert run("gate", "demo:1.0.0", "--policy", policy, env=gated).exit_code == 0


def test_a_policy_that_is_not_utf8_is_one_line(run, gated, tmp_path: Path):
    policy = tmp_path / "p.toml"
    policy.write_bytes('[policy]\nverifiers = ["véra"]\n'.encode("latin-1"))
    result = run("gate", "demo:1.0.0", "--policy", policy, env=gated)
    assert result.exit_code == 2 and "save the policy as UTF-8" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [("min_cycles = -5", "at least 1"), ("min_effect = -1.0", "at least 0"), ('max_age = "0s"', "positive")],
)
def test_policy_values_out_of_range_are_refused(run, gated, tmp_path: Path, rule: str, fragment: str):
    policy = tmp_path / "p.toml"
    policy.write_text(f"[policy]\n{rule}\n")
    result = run("gate", "demo:1.0.0", "--policy", policy, env=gated)
    assert result.exit_code == 2 and fragment in result.stderr


def test_a_failing_rule_prints_what_it_requires(run, gated, tmp_path: Path):
    policy = tmp_path / "p.toml"
    policy.write_text("[policy]\nmin_cycles = 7\n")
    result = run("gate", "demo:1.0.0", "--policy", policy, env=gated)
    assert result.exit_code == 1 and "(minimum 7)" in result.stdout


def test_junit_is_written_even_when_the_gate_cannot_run(run, gated, tmp_path: Path):
    import xml.etree.ElementTree as ET

    policy = tmp_path / "p.toml"
    policy.write_text("[policy]\nmin_cycle = 3\n")
    junit = tmp_path / "gate.xml"
    result = run("gate", "demo:1.0.0", "--policy", policy, "--junit", junit, env=gated)
    assert result.exit_code == 2
    (error,) = ET.parse(junit).getroot().findall("testsuite/testcase/error")
    assert "unknown rule 'min_cycle'" in error.get("message", "")


# -- profiles, login, completion ---------------------------------------------------------------
def test_a_profile_names_the_registry_and_the_environment_wins(run, reg: Registry, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[default]\nregistry = "{tmp_path / "nowhere"}"\n\n[profiles.ci]\nregistry = "{reg.describe()}"\n'
    )
    base = {"REVREG_CONFIG": str(config)}
    assert run("--profile", "ci", "keys", "trusted", env=base).exit_code == 0
    assert run("keys", "trusted", env={**base, "REVREG_PROFILE": "ci"}).exit_code == 0
    assert "no registry at" in run("keys", "trusted", env=base).stderr  # [default] applies
    assert run("keys", "trusted", env={**base, "REVREG_REGISTRY": reg.describe()}).exit_code == 0
    missing = run("--profile", "staging", "ls", env=base)
    assert missing.exit_code == 2 and "no profile 'staging'" in missing.stderr and "ci" in missing.stderr
    assert "REVREG_REGISTRY" not in os.environ  # nothing leaks out of the command


def test_login_stores_a_private_token_the_client_then_uses(run, reg: Registry, tmp_path: Path):
    secret = Tokens(reg).create("me", ["read:*"])[0]
    config = tmp_path / "cfg" / "config.toml"
    env = {"REVREG_CONFIG": str(config)}
    with running(reg) as url:
        bad = subprocess.run(
            [REVREG, "login", url, "--token-stdin"], input="rvr_wrong\n", capture_output=True, text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        assert bad.returncode == 2 and "unknown token" in bad.stderr
        ok = subprocess.run(
            [REVREG, "login", url, "--token-stdin"], input=secret + "\n", capture_output=True, text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        assert ok.returncode == 0 and secret not in ok.stdout + ok.stderr
        creds = config.parent / "credentials.toml"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert run("ls", "--registry", url, env=env).exit_code == 0  # no REVREG_TOKEN: the stored one
        assert "forgot" in run("logout", url, env=env).stdout
        assert run("ls", "--registry", url, env=env).exit_code == 2


def test_shell_completion_is_generated_by_click(reg: Registry):
    proc = subprocess.run(
        [REVREG], env={**os.environ, "_REVREG_COMPLETE": "bash_source"}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "_revreg_completion" in proc.stdout


def test_probes_list_shows_columns_and_which_set_a_name_means(run, reg: Registry, toy, tmp_path: Path):
    env = {"REVREG_REGISTRY": reg.describe()}
    assert run("probes", "push", toy["probes"], env=env).exit_code == 0
    lines = run("probes", "list", env=env).stdout.splitlines()
    assert lines[0].split() == ["NAME", "DIGEST", "PROBES", "OUTPUT", "CREATED"]
    assert lines[1].startswith("*") and "toy-probes" in lines[1] and "(kl)" in lines[1]


# -- progress: on a terminal only ----------------------------------------------------------------
def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the real CLI with stderr on a pseudo-terminal; return (exit code, what the terminal got)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([REVREG, *args], stdout=subprocess.DEVNULL, stderr=slave, env={**os.environ, **env})
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return proc.wait(timeout=60), seen.decode("utf-8", "replace")


def test_progress_shows_on_a_terminal_and_never_in_pipes(reg: Registry, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": reg.describe(), "REVREG_KEYS": str(keys_dir)}
    big = make_artifact(tmp_path / "big.safetensors", keys_dir, size=24 << 20)  # 96 MiB: long enough to draw
    code, terminal = _on_a_terminal(["push", str(big)], env)
    assert code == 0 and "push big.safetensors" in terminal
    reg.yank("demo:1.0.0", "again")
    other = make_artifact(tmp_path / "b.safetensors", keys_dir, "2.0.0", seed=2, size=24 << 20)
    code, quiet = _on_a_terminal(["--quiet", "push", str(other)], env)
    assert code == 0 and "push b.safetensors" not in quiet
    piped = subprocess.run(
        [REVREG, "pull", "demo:2.0.0", "-o", str(tmp_path / "o.safetensors"), "--allow-unpublished"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert piped.returncode == 0 and piped.stderr == ""


def test_json_output_never_carries_a_progress_display(reg: Registry, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": reg.describe(), "REVREG_KEYS": str(keys_dir)}
    big = make_artifact(tmp_path / "big.safetensors", keys_dir, size=24 << 20)
    code, terminal = _on_a_terminal(["push", str(big), "--json"], env)
    assert code == 0 and "push big.safetensors" not in terminal


@pytest.fixture
def not_revreg():
    """A real HTTP server on loopback that is not a revreg registry: a proxy whose backend is
    down (502 HTML) or a captive portal (200 HTML)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status = 502 if self.server.mode == "proxy" else 200  # type: ignore[attr-defined]
            body = b"<html>Bad Gateway</html>" if status == 502 else b"<html>Welcome to the hotel wifi</html>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    server.mode = "proxy"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_a_proxy_or_portal_in_front_of_the_registry_is_unreachable_not_bad_input(run, not_revreg):
    url = f"http://127.0.0.1:{not_revreg.server_address[1]}"
    proxied = run("ls", "--registry", url, env={"REVREG_TOKEN": "rvr_x"})
    assert proxied.exit_code == 3 and "HTTP 502" in proxied.stderr
    not_revreg.mode = "portal"
    portal = run("ls", "--registry", url, env={"REVREG_TOKEN": "rvr_x"})
    assert portal.exit_code == 3 and "not as a revreg registry" in portal.stderr
    for bad in ("http://[::1", "http://127.0.0.1:99999"):
        result = run("ls", "--registry", bad)
        assert result.exit_code == 2 and "not a usable registry URL" in result.stderr


@pytest.mark.parametrize(
    ("config", "credentials"),
    [
        ("profiles = 5\n", None),
        ("[default]\nregistry = 5\n", None),
        ("[default]\nother = 'x'\n", None),
        (None, "tokens = 5\n"),
    ],
)
def test_a_malformed_config_or_credentials_file_is_one_line(run, tmp_path: Path, config, credentials):
    path = tmp_path / "config.toml"
    if config is not None:
        path.write_text(config)
    if credentials is not None:
        (tmp_path / "credentials.toml").write_text(credentials)
    args = ("--profile", "x", "ls") if config == "profiles = 5\n" else ("ls", "--registry", "http://127.0.0.1:1")
    result = run(*args, env={"REVREG_CONFIG": str(path)})
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_verify_refuses_another_base_from_its_files_before_building_a_model(run, toy, tmp_path: Path):
    from safetensors.torch import save_file

    from revreg.verifier.toy import build

    other = tmp_path / "other.safetensors"
    model = build()
    state = {k: v + 1 for k, v in model.state_dict().items()}
    save_file(state, other)
    result = run(
        "verify", toy["artifact"], "--base", other, "--factory", "tests.verifier_helpers:never_built",
        "--probes", toy["probes"],
    )  # fmt: skip
    assert result.exit_code == 2 and "refusing to run (nothing was loaded)" in result.stderr, result.output


def test_verify_shows_its_phases_on_a_terminal(toy, keys_dir: Path):
    code, terminal = _on_a_terminal(
        ["verify", str(toy["artifact"]), "--base", str(toy["base"]), "--factory", "revreg.verifier.toy:build",
         "--probes", str(toy["probes"]), "--cycles", "3"],
        {"REVREG_KEYS": str(keys_dir)},
    )  # fmt: skip
    assert code == 0 and "verify toy:1.0.0" in terminal


def test_key_and_base_changes_print_their_entities_with_json(run, tmp_path: Path, keys_dir: Path, toy):
    env = {"REVREG_REGISTRY": str(tmp_path / "r")}
    assert run("init", env=env).exit_code == 0
    trusted = json.loads(run("keys", "trust", "alice", "--role", "publisher", "--json", env=env).stdout)
    assert trusted["name"] == "alice" and trusted["role"] == "publisher" and not trusted["revoked"]
    base = json.loads(run("base", "register", toy["base"], "--json", env=env).stdout)
    assert base["created"] and base["base"]["identity"].startswith("sha256:")
    (revoked,) = json.loads(run("keys", "revoke", "alice", "--reason", "r", "--json", env=env).stdout)
    assert revoked["revoked"] and revoked["revoked_reason"] == "r"


@pytest.mark.parametrize(
    "args",
    [("inspect", "/nonexistent.safetensors"), ("pull",), ("ls", "--nope"), ("nosuchcommand",), ("pull", "x", "-o")],
)
def test_usage_errors_are_one_line_exit_2(run, args):
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("revreg: error: "), result.stderr


def test_pull_never_replaces_a_symlink_without_force(run, reg: Registry, keys_dir: Path, tmp_path: Path):
    env = {"REVREG_REGISTRY": reg.describe()}
    reg.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    result = run("pull", "demo:1.0.0", "-o", dangling, "--allow-unpublished", env=env)
    assert result.exit_code == 2 and "already exists" in result.stderr and dangling.is_symlink()


def test_a_key_file_that_is_not_pem_is_named_as_the_file(run, reg: Registry, tmp_path: Path):
    bad = tmp_path / "v.ssh"
    bad.write_text("ssh-ed25519 AAAA")
    result = run("keys", "trust", bad, "--role", "verifier", "--name", "other", env={"REVREG_REGISTRY": reg.describe()})
    assert result.exit_code == 2 and "v.ssh" in result.stderr
