"""The registry contract: one suite, run against every implementation of `RegistryAPI` from one
parametrized fixture: embedded SQLite, PostgreSQL, and the remote client over a real loopback
server. Then every registry verb of the CLI against the same three locations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from revreg.artifacts.attestation import sign_certification, verify_certification
from revreg.artifacts.keys import Keyring
from revreg.errors import InputError, IntegrityError, RevregError, UnknownKeyError
from revreg.registry.api import (
    ConflictError,
    GateError,
    NotFound,
    RegistryAPI,
    StateError,
    Unsupported,
    VersionInfo,
    from_json,
    to_json,
)
from tests.conftest import CREATED, Backend, make_artifact, minimal_predicate

TOY = "revreg.verifier.toy:build"


def _trust(api: RegistryAPI, keys_dir: Path) -> None:
    ring = Keyring(keys_dir)
    api.trust_key(ring.public_pem("alice"), "alice", "publisher")
    api.trust_key(ring.public_pem("vera"), "vera", "verifier")


def _certify(api: RegistryAPI, info: VersionInfo, keys_dir: Path, verdict: str = "PASS") -> VersionInfo:
    predicate = minimal_predicate(info.digest, verdict)
    envelope = sign_certification(info.ref, info.digest, predicate, Keyring(keys_dir).signer("vera"))
    return api.record_certification(info.pinned, envelope)


def test_every_implementation_satisfies_the_protocol(backend: Backend):
    assert isinstance(backend.api, RegistryAPI)
    assert backend.api.describe()


def test_lifecycle_through_the_interface(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    assert {(k.name, k.role) for k in api.key_records()} == {("alice", "publisher"), ("vera", "verifier")}
    assert set(api.trusted("publisher")) == {Keyring(keys_dir).signer("alice").keyid}

    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    pushed = api.push(art)
    assert pushed.created and pushed.version.state == "pending"
    assert not api.push(art).created
    assert api.resolve("demo:1.0.0") == pushed.version
    assert api.resolve(pushed.version.pinned).digest == pushed.version.digest
    assert [v.ref for v in api.ls()] == ["demo:1.0.0"] == [v.ref for v in api.ls("demo")]

    with pytest.raises(StateError, match="only a certified version can be published"):
        api.publish("demo:1.0.0")
    assert _certify(api, pushed.version, keys_dir).state == "certified"
    assert api.publish("demo:1.0.0").state == "published"
    assert api.tag("demo:1.0.0", "latest").tags == ("latest",)

    out = tmp_path / "pulled.safetensors"
    assert api.pull("demo", out).digest == pushed.version.digest
    assert out.read_bytes() == art.read_bytes()
    with pytest.raises(InputError, match="no equivalent of revreg kind 'steer'"):
        api.pull("demo:1.0.0", tmp_path / "adapter", fmt="peft")
    assert not (tmp_path / "adapter").exists()

    detail = api.show("demo:latest")
    assert detail.info.state == "published" and detail.manifest["name"] == "demo"
    (cert,) = detail.certifications
    # The envelope crosses the boundary byte for byte: it still verifies on this side.
    assert verify_certification(cert.envelope, api.trusted("verifier")).subject_digest == pushed.version.digest
    assert [h.action for h in detail.history] == ["version.push", "version.certify", "version.publish"]

    assert api.yank("demo:1.0.0", "superseded").state == "yanked"
    with pytest.raises(StateError):
        api.pull("demo:1.0.0", tmp_path / "again.safetensors")
    assert api.audit_verify().ok
    assert api.audit_log("demo:1.0.0")[-1].action == "version.yank"
    report = api.fsck()
    assert report.problems == () and report.versions_checked == 1
    # What the interface reported is what the database holds.
    assert backend.sql.resolve("demo:1.0.0").state == "yanked"


def test_errors_cross_the_boundary_with_their_class(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    with pytest.raises(NotFound, match="no behavior named 'nothing'"):
        api.resolve("nothing:1.0.0")
    with pytest.raises(InputError, match="invalid"):
        api.resolve("bad name!")
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    with pytest.raises(UnknownKeyError, match="keys trust"):
        api.push(art)
    _trust(api, keys_dir)
    api.push(art)
    with pytest.raises(ConflictError, match="immutable"):
        api.push(make_artifact(tmp_path / "b.safetensors", keys_dir, seed=5))
    api.yank("demo:1.0.0", "withdrawn")
    with pytest.raises(StateError, match="yanked; it cannot be tagged"):
        api.tag("demo:1.0.0", "latest")


def test_a_failed_certification_blocks_publish(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    assert _certify(api, info, keys_dir, "FAIL").state == "rejected"
    with pytest.raises(StateError, match="rejected"):
        api.publish(info.ref)


def test_probe_sets_through_the_interface(backend: Backend, toy: dict[str, Path], tmp_path: Path):
    api = backend.api
    info, created = api.push_probes(toy["probes"])
    assert created and not api.push_probes(toy["probes"])[1]
    assert [(p.name, p.digest) for p in api.probe_sets()] == [("toy-probes", info.digest)]
    assert api.probe_digest("toy-probes") == info.digest == api.probe_digest(f"toy-probes@{info.digest}")
    fetched = api.fetch_probes(info.digest, tmp_path)
    assert fetched.read_bytes() == toy["probes"].read_bytes()
    with pytest.raises(NotFound):
        api.probe_digest("other-probes")


def test_bases_through_the_interface(backend: Backend, toy: dict[str, Path]):
    info, created = backend.api.register_base(toy["base"], "toy")
    assert created and backend.api.bases() == [info]
    assert not backend.api.register_base(toy["base"], "toy")[1]


def test_queue_requests_are_pinned_and_complete_once(backend: Backend, keys_dir: Path, tmp_path: Path, toy):
    api = backend.api
    _trust(api, keys_dir)
    v1 = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir, "1.0.0")).version
    v2 = api.push(make_artifact(tmp_path / "b.safetensors", keys_dir, "1.1.0", seed=2)).version
    probes = api.push_probes(toy["probes"])[0]
    api.tag(v1.ref, "stable")
    request = api.request_certification("demo:stable", str(toy["base"]), "toy-probes", TOY)
    # Pinned when made: moving the tag afterwards does not change what a worker will run.
    assert request.ref == v1.pinned and request.probes == probes.digest and request.state == "queued"
    api.tag(v2.ref, "stable")
    claimed = api.claim_request("w1", 60)
    assert claimed is not None and claimed.id == request.id and claimed.ref == v1.pinned
    assert claimed.lease_owner is not None and claimed.lease_owner.endswith("w1")
    assert api.claim_request("w2", 60) is None
    assert api.renew_lease(claimed.id, "w1", 60) and not api.renew_lease(claimed.id, "w2", 60)
    envelope = sign_certification(v1.ref, v1.digest, minimal_predicate(v1.digest), Keyring(keys_dir).signer("vera"))
    assert api.complete_request(claimed.id, "w2", envelope) is None  # not the lease holder
    recorded = api.complete_request(claimed.id, "w1", envelope)
    assert recorded is not None and recorded.ref == v1.ref and recorded.state == "certified"
    assert api.complete_request(claimed.id, "w1", envelope) is None  # exactly once
    assert api.resolve(v2.ref).state == "pending"
    assert [(r.id, r.state) for r in api.requests()] == [(request.id, "done")]

    second = api.request_certification(v2.ref, str(toy["base"]), probes.digest, TOY)
    claimed = api.claim_request("w1", 60)
    assert claimed is not None and claimed.id == second.id
    api.fail_request(claimed.id, "w1", "base not found on this worker")
    (failed,) = api.requests("failed")
    assert failed.result == "base not found on this worker"
    with pytest.raises(InputError, match="unknown request state"):
        api.requests("bogus")


def test_certify_use_case_records_against_the_pinned_digest(backend: Backend, run, toy, keys_dir, tmp_path):
    """The tag moves to another version while the verifier runs: the certification still names,
    and is recorded on, the version that ran."""
    from revreg.certification.certify import ProbeSource, certify, run_pinned

    api = backend.api
    _trust(api, keys_dir)
    v1 = api.push(toy["artifact"]).version
    spec = toy["artifact"].parent / "spec.json"
    other = tmp_path / "v2.safetensors"
    packed = run(
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
        "2.0.0",
        "--key",
        "alice",
        "--created",
        CREATED,
        "-o",
        other,
    )
    assert packed.exit_code == 0, packed.output
    v2 = api.push(other).version
    api.tag(v1.ref, "candidate")
    signer = Keyring(keys_dir).signer("vera")
    pinned = api.resolve("toy:candidate")
    result, envelope = run_pinned(api, pinned, ProbeSource(path=toy["probes"]), toy["base"], signer, TOY)
    api.tag(v2.ref, "candidate")  # moved while "the verifier ran"
    recorded = api.record_certification(pinned.pinned, envelope)
    assert result.passed and recorded.ref == v1.ref and recorded.state == "certified"
    assert api.resolve(v2.ref).state == "pending"
    cert = verify_certification(envelope, api.trusted("verifier"))
    assert cert.subject_digest == v1.digest == cert.predicate["behavior"]["digest"]

    done = certify(api, "toy:candidate", ProbeSource(path=toy["probes"]), toy["base"], signer, TOY, cycles=1)
    assert done.version.digest == v2.digest and done.recorded is not None and done.recorded.ref == v2.ref


def test_one_json_shape_per_entity_round_trips(backend: Backend, keys_dir: Path, tmp_path: Path):
    from revreg.registry.api import VersionDetail

    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    _certify(api, info, keys_dir)
    detail = api.show(info.ref)
    assert from_json(VersionDetail, json.loads(json.dumps(to_json(detail)))) == detail
    assert from_json(VersionInfo, to_json(info)) == info


def test_remote_refuses_what_only_the_server_can_do(backend: Backend):
    if backend.kind != "http":
        assert backend.api.fsck(prune=True).problems == ()
        return
    with pytest.raises(Unsupported, match="runs on the server's machine"):
        backend.api.fsck(prune=True)


# -- every registry verb of the CLI, against every kind of location ----------------------------

# Commands that need the registry's database itself: over HTTP each refuses with one line.
SERVER_SIDE = {"init", "db", "serve", "tokens"}
# Commands that never touch a registry.
# login/logout take a server URL as their argument, not --registry (tested in test_cli_ux.py).
NO_REGISTRY = {"identity", "pack", "inspect", "export", "demo", "probes create", "login", "logout"} | {
    f"keys {verb}" for verb in ("generate", "list", "import", "export")
}


def _verbs() -> set[str]:
    import click

    from revreg.cli.main import cli

    verbs = set()
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        subcommands = getattr(command, "commands", None)
        if subcommands:
            verbs |= {f"{name} {sub}" for sub in subcommands}
        else:
            verbs.add(name)
    return verbs


def test_cli_verbs_work_against_every_location(backend: Backend, run, toy, keys_dir, tmp_path):
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    covered: set[str] = set()

    def ok(verb: str, *args: str | Path) -> str:
        covered.add(verb)
        result = run(*verb.split(), *args, env=env)
        assert result.exit_code == 0, (verb, result.output)
        return result.stdout

    def refused_remotely(verb: str, *args: str | Path) -> None:
        covered.add(verb)
        result = run(*verb.split(), *args, env=env)
        if backend.kind == "http":
            assert result.exit_code == 2 and "run it on the server" in result.stderr, (verb, result.output)
            assert len(result.stderr.strip().splitlines()) == 1
        else:
            assert result.exit_code in (0, 1), (verb, result.output)

    refused_remotely("init")
    refused_remotely("db upgrade")
    refused_remotely("db current")
    refused_remotely("tokens list")
    refused_remotely("tokens create", "t2", "--scope", "read:*")
    refused_remotely("tokens revoke", "t2")
    covered.add("serve")
    if backend.kind == "http":
        served = run("serve", env=env)
        assert served.exit_code == 2 and "run it on the server" in served.stderr

    ok("keys trust", "alice", "--role", "publisher")
    ok("keys trust", "vera", "--role", "verifier")
    assert "vera" in ok("keys trusted")
    ok("push", toy["artifact"])
    ok("probes push", toy["probes"])
    assert "toy-probes" in ok("probes list")
    ok("base register", toy["base"], "--name", "toy")
    assert "toy" in ok("base list")
    assert "toy:1.0.0" in ok("ls")
    assert json.loads(ok("show", "toy:1.0.0", "--json"))["info"]["state"] == "pending"
    assert ok("attestations", "toy:1.0.0") == ""
    verified = run("verify", "toy:1.0.0", "--base", toy["base"], "--factory", TOY, "--probes", "toy-probes",
                   "--cycles", "1", env=env)  # fmt: skip
    covered.add("verify")
    assert verified.exit_code == 0, verified.output
    ok("certify", "toy:1.0.0", "--queue", "--base", toy["base"], "--factory", TOY, "--probes", toy["probes"])
    assert "queued" in ok("queue")
    ok("worker", "--key", "vera", "--drain", "--poll", "0.1", "--id", "w")
    assert "done" in ok("queue")
    ok("certify", "toy:1.0.0", "--base", toy["base"], "--factory", TOY, "--probes", "toy-probes", "--key", "vera",
       "--cycles", "1")  # fmt: skip
    ok("publish", "toy:1.0.0")
    ok("tag", "toy:1.0.0", "stable")
    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\nverifiers = ["vera"]\n')
    ok("gate", "toy:stable", "--policy", policy)
    ok("pull", "toy:stable", "-o", tmp_path / "pulled.safetensors")
    assert (tmp_path / "pulled.safetensors").read_bytes() == toy["artifact"].read_bytes()
    ok("audit checkpoint", "--key", "vera", "-o", tmp_path / "checkpoint.json")
    ok("audit verify", "--checkpoint", tmp_path / "checkpoint.json", "--checkpoint-key", "vera")
    assert "version.publish" in ok("audit log")
    ok("audit report", "-o", tmp_path / "report.json")
    ok("fsck")
    ok("yank", "toy:1.0.0", "--reason", "done")
    ok("keys revoke", "alice", "--reason", "rotated")

    registry_verbs = _verbs() - NO_REGISTRY
    assert registry_verbs - covered == set(), "a registry verb is missing from the contract"


def test_importing_the_remote_client_does_not_import_sqlalchemy():
    code = (
        "import sys; import revreg.registry.remote, revreg.registry.locate, revreg.certification.certify; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic', 'torch')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_verifier_imports_no_registry_code():
    import ast

    root = Path(__file__).resolve().parents[1] / "revreg" / "verifier"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}" for n in names if n.startswith(("revreg.registry", "revreg.certification"))
            ]
    assert offenders == []


def test_an_unsupported_location_is_one_clear_line(run):
    result = run("ls", "--registry", "ftp://example.org/reg")
    assert result.exit_code == 2 and "unsupported registry location" in result.stderr


def test_errors_are_revreg_errors():
    for cls in (NotFound, ConflictError, StateError, GateError, Unsupported, IntegrityError):
        assert issubclass(cls, RevregError)
