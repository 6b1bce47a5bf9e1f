"""The driver-level listing (registry.reader): `revreg ls` on an embedded registry reads it with
sqlite3 alone; `Registry.ls` runs the same code on its engine's connection, on every backend."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from revreg.artifacts.keys import Keyring
from revreg.errors import InputError
from revreg.registry.api import NotFound, SchemaError
from revreg.registry.reader import ls_sqlite, sqlite_file, utc
from tests.conftest import make_artifact


def _fill(registry, keys_dir: Path, tmp_path: Path) -> None:
    """Versions of two behaviors (names that collations order differently), tags, a yank, and a revoked signer."""
    ring = Keyring(keys_dir)
    ring.generate("mallory")
    registry.trust_key(ring.public_pem("mallory"), "mallory", "publisher")
    for i, (name, key) in enumerate(
        [("zeta", "alice"), ("alpha", "alice"), ("zeta", "mallory"), ("a-z", "alice"), ("alpha", "alice")]
    ):
        path = make_artifact(tmp_path / f"a{i}.safetensors", keys_dir, f"1.0.{i}", name=name, seed=i, key=key)
        registry.push(path)
    registry.tag("zeta:1.0.0", "stable")
    registry.tag("zeta:1.0.0", "b-tag")
    registry.yank("alpha:1.0.1", "bad")
    registry.revoke_key("mallory", "lost")


def test_registry_ls_and_the_sqlalchemy_free_reader_agree(registry, keys_dir: Path, tmp_path: Path):
    _fill(registry, keys_dir, tmp_path)
    listed = registry.ls()
    assert [v.ref for v in listed] == ["a-z:1.0.3", "alpha:1.0.1", "alpha:1.0.4", "zeta:1.0.0", "zeta:1.0.2"]
    by_ref = {v.ref: v for v in listed}
    assert by_ref["zeta:1.0.0"].tags == ("b-tag", "stable")
    assert by_ref["alpha:1.0.1"].state == "yanked" and by_ref["alpha:1.0.1"].yank_reason == "bad"
    assert by_ref["zeta:1.0.2"].signer_revoked and by_ref["zeta:1.0.2"].signer_name == "mallory"
    assert all(v.pushed_at.utcoffset() is not None and v.pushed_at.utcoffset().total_seconds() == 0 for v in listed)
    for v in listed:  # the listing says what resolving each version says
        assert registry.resolve(v.ref, tags=False) == v
    assert [v.ref for v in registry.ls("zeta")] == ["zeta:1.0.0", "zeta:1.0.2"]
    with pytest.raises(NotFound, match="no behavior named 'nobody'"):
        registry.ls("nobody")
    if registry.location.is_sqlite:
        db_file = registry.location.directory / "registry.db"
        assert ls_sqlite(db_file, "here") == listed
        assert ls_sqlite(db_file, "here", "zeta") == registry.ls("zeta")


def test_ls_of_a_missing_registry_creates_nothing(run, tmp_path: Path):
    for location in (tmp_path / "nowhere", f"sqlite:///{tmp_path / 'none.db'}"):
        result = run("ls", "--registry", location)
        assert result.exit_code == 2 and "create one with `revreg init`" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]  # the fixture's keyring only


def test_ls_refuses_a_database_at_another_schema_or_not_a_registry(run, embedded, tmp_path: Path):
    registry = embedded
    directory = registry.location.directory
    with sqlite3.connect(directory / "registry.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
    result = run("ls", "--registry", directory)
    assert result.exit_code != 0 and "revision 0001" in result.stderr and "revreg db upgrade" in result.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "registry.db").write_bytes(b"not a database at all" * 100)
    result = run("ls", "--registry", junk)
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    sqlite3.connect(empty / "registry.db").close()
    result = run("ls", "--registry", empty)
    assert result.exit_code != 0 and "create one with `revreg init`" in result.stderr


def test_ls_of_a_sqlite_url_matches_the_directory_form(run, embedded, keys_dir: Path, tmp_path: Path):
    registry = embedded
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    directory = registry.location.directory
    by_dir = run("ls", "--json", "--registry", directory)
    by_url = run("ls", "--json", "--registry", f"sqlite:///{directory / 'registry.db'}")
    assert by_dir.exit_code == 0 and by_dir.stdout == by_url.stdout and "demo" in by_dir.stdout


def test_locations_the_reader_leaves_to_sqlalchemy():
    assert sqlite_file("postgresql+psycopg://x@h/db") is None
    assert sqlite_file("http://127.0.0.1:1") is None
    assert sqlite_file("sqlite:///f.db?timeout=3") is None  # options only SQLAlchemy reads
    assert sqlite_file("sqlite:///relative.db") == Path("relative.db").absolute()  # as SQLAlchemy opens it
    assert sqlite_file("reg") == Path("reg").resolve() / "registry.db"


def test_stored_timestamps_parse_as_utc():
    assert utc("2026-12-01 12:25:33.123456").isoformat() == "2026-12-01T12:25:33.123456+00:00"
    assert utc("2026-12-01 13:25:33+01:00").isoformat() == "2026-12-01T12:25:33+00:00"
    with pytest.raises(SchemaError):
        utc(12345)
    with pytest.raises(SchemaError):
        utc("yesterday")


def test_missing_registry_is_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="no registry at"):
        ls_sqlite(tmp_path / "registry.db", str(tmp_path))


@pytest.mark.parametrize(
    "corruption",
    [
        "DROP TABLE tags",
        "ALTER TABLE versions DROP COLUMN yank_reason",
        "UPDATE versions SET size = 'abc'",
        "UPDATE versions SET pushed_at = 12345 WHERE version = '1.0.1'",
        "UPDATE versions SET digest = X'00ff'",
        "UPDATE versions SET state = X'01'",
        "UPDATE tags SET tag = X'01'",
        "UPDATE keys SET name = X'01'",
        "UPDATE versions SET size = 9e999",
        "UPDATE versions SET pushed_at = '9999-12-31T23:00:00-14:00'",
        "ALTER TABLE versions RENAME TO v0; CREATE VIEW versions AS SELECT * FROM v0 WHERE nosuchfn(id)",
        "DROP TABLE keys",
        "UPDATE versions SET size = CAST('1' || printf('%.*c', 400, '0') AS BLOB)",
        "UPDATE versions SET size = 1.5",
        "UPDATE versions SET size = -1",
        "ALTER TABLE tags RENAME TO t2; CREATE VIEW tags AS SELECT * FROM unlocked_tbl",
        "ALTER TABLE tags RENAME TO t2; CREATE VIEW tags AS SELECT busy(1) AS version_id, 'x' AS tag",
        "UPDATE versions SET state = CAST(X'ff6c6f636b6564' AS TEXT)",
    ],
)
def test_ls_of_a_damaged_database_is_one_line_not_a_traceback(run, embedded, keys_dir: Path, tmp_path, corruption):
    registry = embedded
    for i in range(2):
        registry.push(make_artifact(tmp_path / f"a{i}.safetensors", keys_dir, f"1.0.{i}", seed=i))
    registry.tag("demo:1.0.0", "stable")
    directory = registry.location.directory
    with sqlite3.connect(directory / "registry.db") as conn:
        conn.executescript(corruption)
    for args in (("ls",), ("ls", "--json")):
        cli = run(*args, "--registry", directory)
        assert cli.exit_code == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        assert "Traceback" not in cli.stderr
    with pytest.raises(SchemaError):
        registry.ls()


def test_ls_of_sqlalchemy_only_sqlite_urls_creates_nothing(run, tmp_path: Path):
    for url in (f"sqlite:///{tmp_path / 'a.db'}?timeout=1", f"sqlite+pysqlite:///{tmp_path / 'b.db'}"):
        result = run("ls", "--registry", url)
        assert result.exit_code == 2 and "create one with `revreg init`" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_only_sqlites_own_codes_make_a_database_unreachable(tmp_path: Path):
    """Locked or busy is "try again" (exit 3); everything else a database says is about what it
    holds (exit 2), whatever words its message quotes."""
    from revreg.registry.reader import unreachable

    path = tmp_path / "d.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as busy:
        other.execute("SELECT * FROM t")
    assert unreachable(busy.value)
    holder.execute("COMMIT")
    with pytest.raises(sqlite3.OperationalError) as missing:
        other.execute("SELECT * FROM busy_locked_unable_to_open")
    assert not unreachable(missing.value)


def test_a_database_whose_schema_text_is_not_utf8_is_one_line(run, embedded, keys_dir: Path, tmp_path: Path):
    embedded.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    with sqlite3.connect(embedded.location.directory / "registry.db") as conn:
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = CAST(X'435245415445ff' AS TEXT) "
            "WHERE name = (SELECT name FROM sqlite_master WHERE type = 'index' LIMIT 1)"
        )
    for args in (("ls",), ("fsck",), ("push", tmp_path / "a.safetensors")):
        result = run(*args, "--registry", embedded.location.directory)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "damaged" in result.stderr
