"""`revreg push` / `revreg pull` on an embedded registry (registry.embedded): the reads before a
push's copy run on sqlite3 and SQLAlchemy loads beside the copy; a pull streams while the SQL
registry checks it. Every rule of the SQL registry must still hold, and the output must be what
the slow path would have produced."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from revreg.artifacts.keys import Keyring
from revreg.registry.embedded import Embedded, SqliteCatalog
from revreg.registry.reader import open_sqlite, publisher_trust, version_info
from revreg.registry.refs import Ref, parse_ref
from tests.conftest import make_artifact

REVREG = str(Path(sys.executable).parent / "revreg")


def _push_versions(registry, keys_dir: Path, tmp_path: Path, n: int = 3) -> list[Path]:
    paths = [make_artifact(tmp_path / f"a{i}.safetensors", keys_dir, f"1.0.{i}", seed=i) for i in range(n)]
    for p in paths:
        registry.push(p)
    return paths


def test_a_pushs_reads_agree_with_the_sql_registry(registry, keys_dir: Path, tmp_path: Path):
    """`Registry.stored`/`trust` (its engine's connection) and the same reads through sqlite3 say
    the same, on both backends; they are also what resolving and `trusted` say."""
    _push_versions(registry, keys_dir, tmp_path)
    ring = Keyring(keys_dir)
    ring.generate("mallory")
    registry.trust_key(ring.public_pem("mallory"), "mallory", "publisher")
    registry.trust_key(ring.public_pem("mallory"), "mallory", "verifier")
    registry.revoke_key("mallory", "lost")
    registry.tag("demo:1.0.1", "stable")
    for v in registry.ls():
        assert registry.stored(v.name, v.version) == registry.resolve(Ref(v.name, v.version), tags=False) == v
    assert registry.stored("demo", "stable") is None  # a tag is not a version
    assert registry.stored("demo", "9.9.9") is None and registry.stored("nobody", "1.0.0") is None
    trust = registry.trust()
    assert {k: name for k, (name, _pem) in trust.publishers.items()} == {
        k: t.name for k, t in registry.trusted("publisher").items()
    }
    mallory = {k.keyid for k in registry.key_records() if k.name == "mallory"}
    assert set(trust.revoked) == mallory and trust.revoked[next(iter(mallory))] == ("mallory", "lost")
    if registry.location.is_sqlite:
        db = registry.location.directory / "registry.db"
        conn = open_sqlite(db, str(db))
        try:
            assert publisher_trust(conn) == trust
            for v in registry.ls():
                assert version_info(conn, v.name, v.version) == v
            catalog = SqliteCatalog(conn, str(db))
            assert catalog.hint(parse_ref("demo:stable")) == registry.resolve("demo:stable")
            digest = registry.resolve("demo:1.0.2").digest
            assert catalog.hint(parse_ref(f"demo@{digest}")) == registry.resolve(f"demo@{digest}")
            assert catalog.hint(parse_ref("demo")) is None  # "latest" is the SQL registry's to say
            assert catalog.hint(parse_ref("nobody:1.0.0")) is None
        finally:
            conn.close()


def _revreg(keys_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REVREG_KEYS": str(keys_dir)}
    return subprocess.run([REVREG, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_the_real_entry_point_flushes_its_output_and_leaves_no_wal(embedded, keys_dir: Path, tmp_path: Path):
    """`revreg push`/`pull` end without the interpreter's teardown: their output must still
    arrive whole through a pipe, and the database must be closed (no -wal file left)."""
    path = make_artifact(tmp_path / "a.safetensors", keys_dir)
    where = embedded.location.directory
    embedded.engine.dispose()
    pushed = _revreg(keys_dir, "push", path, "--json", "--registry", where)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)[0]["created"] is True
    assert not (where / "registry.db-wal").exists()
    again = _revreg(keys_dir, "push", path, "--registry", where)
    assert again.returncode == 0 and again.stdout.startswith("already present: demo:1.0.0 sha256:")
    out = tmp_path / "out.safetensors"
    pulled = _revreg(keys_dir, "pull", "demo:1.0.0", "--allow-unpublished", "-o", out, "--json", "--registry", where)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["output"] == str(out) and out.read_bytes() == path.read_bytes()
    assert not (where / "registry.db-wal").exists()
    refused = _revreg(keys_dir, "pull", "demo:1.0.0", "-o", tmp_path / "no.safetensors", "--registry", where)
    assert refused.returncode == 2 and "is pending, not published" in refused.stderr
    assert refused.stderr.count("\n") == 1
    # With standard output closed (sys.stdout is None) a push or pull that succeeded still exits 0.
    closed = tmp_path / "closed.safetensors"
    for args, redirect in (
        (["push", path], " >&-"),
        (["push", path], " 2>&-"),  # with standard error closed too (sys.stderr is None)
        (["pull", "demo:1.0.0", "--allow-unpublished", "-o", closed], " >&-"),
    ):
        line = " ".join(shlex.quote(str(a)) for a in [REVREG, *args, "--registry", where])
        done = subprocess.run(
            ["bash", "-c", line + redirect],
            capture_output=True,
            text=True,
            env={**os.environ, "REVREG_KEYS": str(keys_dir)},
            timeout=120,
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert closed.read_bytes() == path.read_bytes()


def test_a_stored_push_never_loads_sqlalchemy(embedded, keys_dir: Path, tmp_path: Path):
    path = make_artifact(tmp_path / "a.safetensors", keys_dir)
    embedded.push(path)
    where = embedded.location.directory
    probe = (
        "import sys\n"
        "from revreg.cli.main import cli\n"
        f"cli.main(['push', {str(path)!r}, '--registry', {str(where)!r}], standalone_mode=False)\n"
        "print('LOADED' if 'sqlalchemy' in sys.modules else 'NOT LOADED')\n"
    )
    env = {**os.environ, "REVREG_KEYS": str(keys_dir)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("already present: demo:1.0.0 sha256:") and lines[1:] == ["NOT LOADED"]


def test_a_refused_pull_reports_the_refusal_and_leaves_nothing(run, embedded, keys_dir: Path, tmp_path: Path):
    """The copy starts before the SQL registry has decided; its refusal must win over whatever
    the copy met (here: the blob is gone), and no staging file may stay beside the output."""
    path = make_artifact(tmp_path / "a.safetensors", keys_dir)
    info = embedded.push(path).version
    where = embedded.location.directory
    outdir = tmp_path / "out"
    outdir.mkdir()
    refused = run("pull", "demo:1.0.0", "-o", outdir / "x.safetensors", "--registry", where)
    assert refused.exit_code == 2 and "pending, not published" in refused.output
    blob = where / "blobs" / "sha256" / info.digest[7:9] / info.digest[7:]
    assert blob.is_file()
    blob.unlink()
    refused = run("pull", "demo:1.0.0", "-o", outdir / "x.safetensors", "--registry", where)
    assert refused.exit_code == 2 and "pending, not published" in refused.output
    missing = run("pull", "demo:1.0.0", "--allow-unpublished", "-o", outdir / "x.safetensors", "--registry", where)
    assert missing.exit_code == 1 and "pending" not in missing.output
    embedded.yank("demo:1.0.0", "bad")
    yanked = run("pull", "demo:1.0.0", "--allow-unpublished", "-o", outdir / "x.safetensors", "--registry", where)
    assert yanked.exit_code == 2 and "was yanked (bad)" in yanked.output
    assert list(outdir.iterdir()) == []


def test_a_pull_whose_guess_went_stale_is_done_again_by_the_sql_registry(
    embedded, keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A tag can move between the sqlite3 lookup and the SQL registry's check. The lookup is
    made stale here by hand (the race itself cannot be timed in a test): the output must be the
    version the check names, never the guessed one."""
    first, second = _push_versions(embedded, keys_dir, tmp_path, 2)
    embedded.tag("demo:1.0.1", "stable")
    where = embedded.location.directory
    stale = embedded.resolve("demo:1.0.0")
    monkeypatch.setattr(SqliteCatalog, "hint", lambda self, ref: stale)
    out = tmp_path / "out.safetensors"
    with Embedded(str(where), where / "registry.db") as fast:
        info = fast.pull("demo:stable", out, allow_unpublished=True)
    assert info.version == "1.0.1" and out.read_bytes() == second.read_bytes() != first.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    # A yanked version pulled this way is audited once, by the one check that ran (red team).
    embedded.yank("demo:1.0.1", "bad")
    out.unlink()
    with Embedded(str(where), where / "registry.db") as fast:
        fast.pull("demo:stable", out, allow_unpublished=True, allow_yanked=True)
    pulls = [e for e in embedded.audit_log() if e.action == "version.pull-yanked"]
    assert [e.subject for e in pulls] == ["demo:1.0.1"]


@pytest.mark.parametrize("name", ["reg%41", "reg%2541", "reg?x", "reg x"])
def test_a_directory_name_with_url_characters_is_one_registry(run, keys_dir: Path, tmp_path: Path, name: str):
    """SQLAlchemy decodes %XX in a database URL and reads "?" as options; sqlite3 reads the file as
    named. Both must open the same database: a `reg%41` beside a `regA` that trusts another key
    must neither take the push's reads from one and record it in the other (red team)."""
    ring = Keyring(keys_dir)
    ring.generate("mallory")
    target, decoy = tmp_path / name, tmp_path / "regA"
    for where, key in ((target, "alice"), (decoy, "mallory")):
        assert run("init", "--registry", where).exit_code == 0
        assert run("keys", "trust", key, "--role", "publisher", "--registry", where).exit_code == 0
    good = make_artifact(tmp_path / "good.safetensors", keys_dir, key="alice")
    evil = make_artifact(tmp_path / "evil.safetensors", keys_dir, key="mallory", seed=1)
    pushed = run("push", good, "--registry", target)
    assert pushed.exit_code == 0, pushed.output
    refused = run("push", evil, "--registry", target)
    assert refused.exit_code == 1 and "unknown key" in refused.output
    listed = run("ls", "--json", "--registry", target)
    assert [v["name"] for v in json.loads(listed.output)] == ["demo"]
    assert json.loads(run("ls", "--json", "--registry", decoy).output) == []
    from revreg.registry.service import Registry

    library = Registry.open(str(target))
    try:
        assert [v.ref for v in library.ls()] == ["demo:1.0.0"]
    finally:
        library.engine.dispose()


def test_a_path_through_a_link_and_dotdot_is_one_registry(run, keys_dir: Path, tmp_path: Path, monkeypatch):
    """`link/../A`: the OS (and sqlite3) follow the link, then `..`; SQLAlchemy's SQLite dialect
    would drop `link/..` as text. The push must check trust in the registry it records in, the
    one the OS names (red team round 6)."""
    Keyring(keys_dir).generate("mallory")
    (tmp_path / "other" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "other" / "sub", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for where, key in (("A", "alice"), ("other/A", "mallory")):
        assert run("init", "--registry", where).exit_code == 0
        assert run("keys", "trust", key, "--role", "publisher", "--registry", where).exit_code == 0
    evil = make_artifact(tmp_path / "evil.safetensors", keys_dir, key="mallory")
    pushed = run("push", evil, "--registry", "link/../A")
    assert pushed.exit_code == 0, pushed.output  # other/A trusts mallory, and records it
    assert json.loads(run("ls", "--json", "--registry", "A").output) == []  # A never trusted mallory
    assert [v["name"] for v in json.loads(run("ls", "--json", "--registry", "other/A").output)] == ["demo"]
    assert run("fsck", "--registry", "other/A").exit_code == 0
    created = run("init", "--registry", "link/../C")
    assert created.exit_code == 0, created.output
    assert (tmp_path / "other" / "C" / "registry.db").is_file() and not (tmp_path / "C").exists()


def test_a_sqlite_location_is_named_as_the_user_names_it():
    """Errors name the file, not its %-encoded URL (red team round 6)."""
    from revreg.registry.db import _redact

    assert _redact("sqlite:////x/r%2541/registry.db") == "/x/r%41/registry.db"
    assert _redact("sqlite:////x/%C3%BC%20dir/registry.db") == "/x/\u00fc dir/registry.db"
    assert _redact("postgresql+psycopg://u:secret@h/db") == "postgresql+psycopg://u:***@h/db"
