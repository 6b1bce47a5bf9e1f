"""The real `revreg` entry point when its output cannot be written, and `init` and `pull` on
paths that cannot be used: one line and exit 2 (a closed pipe: quietly, 141), nothing half-made;
a command whose output is lost runs to its end, and its own error, if it has one, wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from revreg.cli.main import CLOSED_PIPE_EXIT
from tests.conftest import make_artifact

REVREG = str(Path(sys.executable).parent / "revreg")
FULL = Path("/dev/full")


def _env(keys_dir: Path) -> dict[str, str]:
    return {**os.environ, "REVREG_KEYS": str(keys_dir)}


def _to_full(keys_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    with open(FULL, "w") as full:
        return subprocess.run(
            [REVREG, *map(str, args)], stdout=full, stderr=subprocess.PIPE, text=True, env=_env(keys_dir), timeout=120
        )


def _to_closed_pipe(keys_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        return subprocess.run(
            [REVREG, *map(str, args)], stdout=write, stderr=subprocess.PIPE, text=True, env=_env(keys_dir), timeout=120
        )
    finally:
        os.close(write)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("revreg: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "args",
    [("--help",), ("ls", "--registry", "{reg}"), ("ls", "--json", "--registry", "{reg}"), ("keys", "list")],
)
def test_a_report_that_cannot_be_written_is_one_line_and_exit_2(embedded, keys_dir: Path, args: tuple[str, ...]):
    done = _to_full(keys_dir, *(a.format(reg=embedded.location.directory) for a in args))
    assert done.returncode == 2
    assert "cannot write to standard output: No space left on device" in _one_error_line(done)


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_a_push_whose_report_is_lost_is_still_stored(embedded, keys_dir: Path, tmp_path: Path, json_flag):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    done = _to_full(keys_dir, "push", art, *json_flag, "--registry", embedded.location.directory)
    assert done.returncode == 2
    assert "the command ran to its end" in _one_error_line(done)
    assert [v.ref for v in embedded.ls()] == ["demo:1.0.0"]


@pytest.mark.parametrize("broken", ["full", "closed pipe"])
@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_lost_output_neither_stops_a_push_of_several_files_nor_hides_a_refusal(
    embedded, keys_dir: Path, tmp_path: Path, broken: str, json_flag
):
    good = [make_artifact(tmp_path / f"{v}.safetensors", keys_dir, v) for v in ("1.0.0", "1.0.1")]
    tampered = tmp_path / "t.safetensors"
    data = bytearray(make_artifact(tmp_path / "x.safetensors", keys_dir, "1.0.2").read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    run = _to_full if broken == "full" else _to_closed_pipe
    done = run(keys_dir, "push", *good, tampered, *json_flag, "--registry", embedded.location.directory)
    assert done.returncode == 1  # the tampered file's verdict, not the lost report's
    assert "do not match the signed manifest" in _one_error_line(done)
    assert sorted(v.ref for v in embedded.ls()) == ["demo:1.0.0", "demo:1.0.1"]


def test_a_short_write_is_an_error_not_a_truncated_success(keys_dir: Path, tmp_path: Path):
    """A file size limit (or a disk that fills up) lets a write through in part: the rest is
    written or the command says it was lost; it does not exit 0 with half its output."""
    import resource

    out = tmp_path / "help.txt"
    with open(out, "w") as fh:
        done = subprocess.run(
            [REVREG, "--help"],
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(keys_dir),
            timeout=120,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)),
        )
    assert out.stat().st_size == 1024
    assert done.returncode == 2 and "cannot write to standard output" in _one_error_line(done)


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")
def test_an_error_is_still_its_own_exit_code_when_standard_error_is_broken(embedded, keys_dir: Path):
    with open(FULL, "w") as full:
        for args in (["show", "nope:1.0.0", "--registry", str(embedded.location.directory)], ["--bogus"]):
            done = subprocess.run([REVREG, *args], stdout=full, stderr=full, env=_env(keys_dir), timeout=120)
            assert done.returncode == 2, args  # not 1 ("a check failed") from an unreported traceback


@pytest.mark.parametrize("args", [("ls", "--json"), ("push", "{art}", "--json")])
def test_a_reader_that_went_away_ends_the_command_quietly(embedded, keys_dir: Path, tmp_path: Path, args):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    embedded.push(make_artifact(tmp_path / "b.safetensors", keys_dir, "0.9.0"))
    done = _to_closed_pipe(keys_dir, *(a.format(art=art) for a in args), "--registry", embedded.location.directory)
    assert done.returncode == CLOSED_PIPE_EXIT == 141
    assert done.stderr == ""
    assert "demo:1.0.0" in [v.ref for v in embedded.ls()] or args[0] == "ls"


def _init(keys_dir: Path, where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REVREG, "init", "--registry", str(where)], capture_output=True, text=True, env=_env(keys_dir), timeout=120
    )


def test_init_refuses_a_path_that_cannot_be_a_registry_directory(keys_dir: Path, tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for where, fragment in ((afile, "exists and is not a directory"), (afile / "sub", "Not a directory")):
        done = _init(keys_dir, where)
        assert done.returncode == 2 and fragment in _one_error_line(done)
    assert afile.read_text() == "x"


def test_init_over_a_file_that_is_not_a_registry_database_makes_nothing(keys_dir: Path, tmp_path: Path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "registry.db").write_bytes(os.urandom(5000))
    before = (junk / "registry.db").read_bytes()
    done = _init(keys_dir, junk)
    assert done.returncode == 2 and "not a registry" in _one_error_line(done)
    assert sorted(p.name for p in junk.iterdir()) == ["registry.db"]  # no blobs/ beside it
    assert (junk / "registry.db").read_bytes() == before
    taken = tmp_path / "taken"
    (taken / "registry.db").mkdir(parents=True)
    done = _init(keys_dir, taken)
    assert done.returncode == 2 and "is not a file" in _one_error_line(done)
    assert sorted(p.name for p in taken.iterdir()) == ["registry.db"]


def test_init_twice_is_a_no_op(keys_dir: Path, tmp_path: Path):
    first, again = _init(keys_dir, tmp_path / "reg"), _init(keys_dir, tmp_path / "reg")
    assert first.returncode == again.returncode == 0 and first.stdout == again.stdout


def _pull(keys_dir: Path, reg: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [REVREG, "pull", "demo:1.0.0", "--allow-unpublished", "--registry", str(reg), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(keys_dir), timeout=120)


def test_pull_outputs_that_cannot_be_made_are_refused_in_one_line(embedded, keys_dir: Path, tmp_path: Path):
    embedded.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    reg = embedded.location.directory
    afile = tmp_path / "afile"
    afile.write_text("x")
    done = _pull(keys_dir, reg, "-o", afile / "x")
    assert done.returncode == 2 and f"{afile} is not a directory" in _one_error_line(done)
    done = _pull(keys_dir, reg, "-o", f"{tmp_path / 'nodir'}/")
    assert done.returncode == 2 and "names a directory, and there is none" in _one_error_line(done)
    done = _pull(keys_dir, reg, "-o", tmp_path / "nodir" / "x.safetensors")
    assert done.returncode == 2 and "does not exist; nothing was written" in _one_error_line(done)
    assert not (tmp_path / "nodir").exists() and not list(tmp_path.rglob("*.partial"))
    assert afile.read_text() == "x"
    cmd = [REVREG, "pull", "demo:1.0.0", "--allow-unpublished", "--registry", str(reg), "-o", "-"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(keys_dir), timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "-o - is not supported" in _one_error_line(done) and done.stdout == ""
    assert not (tmp_path / "-").exists()


def test_pull_force_replaces_a_link_never_what_it_points_to(embedded, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    embedded.push(art)
    target, link, dangling = tmp_path / "target", tmp_path / "link", tmp_path / "dangling"
    target.write_text("keep me")
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (link, dangling):
        refused = _pull(keys_dir, embedded.location.directory, "-o", out)
        assert refused.returncode == 2 and "pass --force" in _one_error_line(refused)
        done = _pull(keys_dir, embedded.location.directory, "-o", out, "--force")
        assert done.returncode == 0, done.stderr
        assert not out.is_symlink() and out.read_bytes() == art.read_bytes()
    assert target.read_text() == "keep me" and not (tmp_path / "nowhere").exists()
    (tmp_path / "adir").mkdir()
    (tmp_path / "dirlink").symlink_to(tmp_path / "adir")
    done = _pull(keys_dir, embedded.location.directory, "-o", f"{tmp_path / 'dirlink'}/", "--force")
    assert done.returncode == 2 and "names a directory" in _one_error_line(done)
    assert (tmp_path / "dirlink").is_symlink()


def _sqlite(path: Path, *statements: str) -> None:
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("statements", "fragment"),
    [
        (["CREATE TABLE t (x)"], "holds other tables (t) and no revreg schema"),
        (["CREATE TABLE settings (x)"], "holds other tables (settings)"),
        (
            ["CREATE TABLE alembic_version (version_num VARCHAR(32))", "INSERT INTO alembic_version VALUES ('9999')"],
            "revision '9999', which this revreg does not know",
        ),
    ],
)
def test_init_and_db_upgrade_never_take_over_another_database(
    keys_dir: Path, tmp_path: Path, statements: list[str], fragment: str
):
    where = tmp_path / "reg"
    _sqlite(where / "registry.db", *statements)
    before = (where / "registry.db").read_bytes()
    for command in (["init"], ["db", "upgrade"]):
        cmd = [REVREG, *command, "--registry", str(where)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(keys_dir), timeout=120)
        assert done.returncode == 2 and fragment in _one_error_line(done), command
    assert sorted(p.name for p in where.iterdir()) == ["registry.db"] and (where / "registry.db").read_bytes() == before


def test_init_refuses_a_blob_store_path_that_is_a_file_and_makes_no_database(keys_dir: Path, tmp_path: Path):
    where = tmp_path / "reg"
    where.mkdir()
    (where / "blobs").write_text("x")
    done = _init(keys_dir, where)
    assert done.returncode == 2 and "is not a directory: it cannot hold the blob store" in _one_error_line(done)
    assert sorted(p.name for p in where.iterdir()) == ["blobs"]


def test_a_sqlite_url_through_a_link_and_dotdot_is_checked_as_the_file_sqlite_opens(keys_dir: Path, tmp_path: Path):
    """`sqlite:///l/../other.db` with `l` a link: SQLAlchemy opens `other.db` beside `l` (the
    path normalised as text); the check reads that file, and refuses it, unchanged."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "l").symlink_to(tmp_path / "a" / "sub")
    other = tmp_path / "other.db"
    _sqlite(other, "CREATE TABLE customers (x)")
    before = other.read_bytes()
    url = f"sqlite:///{tmp_path}/l/../other.db"
    cmd = [REVREG, "init", "--registry", url, "--store", str(tmp_path / "blobs")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(keys_dir), timeout=120)
    assert done.returncode == 2 and "holds other tables (customers)" in _one_error_line(done)
    assert other.read_bytes() == before and not (tmp_path / "blobs").exists()


def test_init_never_takes_over_a_postgresql_database_with_other_tables(pg_url: str, keys_dir: Path, tmp_path: Path):
    import psycopg

    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (x int)")
    cmd = [REVREG, "init", "--registry", pg_url, "--store", str(tmp_path / "blobs")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(keys_dir), timeout=120)
    assert done.returncode == 2 and "holds other tables (invoices)" in _one_error_line(done)
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    assert tables == ["invoices"] and not (tmp_path / "blobs").exists()


def test_a_registry_path_that_is_not_utf8_is_one_line(keys_dir: Path, tmp_path: Path):
    where = os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xff")
    for args, fragment in ((["init", "--registry", where], "must be valid UTF-8"), (["ls", "--registry", where], "")):
        done = subprocess.run([REVREG, *args], capture_output=True, text=True, env=_env(keys_dir), timeout=120)
        assert done.returncode == 2 and fragment in _one_error_line(done), args
    assert [p for p in os.listdir(tmp_path) if p != "keys"] == []  # init made nothing


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")
def test_an_ascii_locale_still_goes_through_the_checked_writer(keys_dir: Path):
    env = {**_env(keys_dir), "PYTHONIOENCODING": "ascii"}
    with open(FULL, "w") as full:
        done = subprocess.run([REVREG, "--version"], stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 2 and "cannot write to standard output" in _one_error_line(done)


def test_signed_free_text_cannot_draw_over_what_a_reviewer_reads(embedded, keys_dir: Path, tmp_path: Path):
    """A description is the signer's text: inspect and show print its control characters as
    escapes, so it cannot clear the screen or add a line such as a fake verdict."""
    art = make_artifact(tmp_path / "a.safetensors", keys_dir, description="fine\x1b[2J\nsignature    OK\u202e")
    embedded.push(art)
    for args in (["inspect", str(art)], ["show", "demo:1.0.0", "--registry", str(embedded.location.directory)]):
        done = subprocess.run([REVREG, *args], capture_output=True, text=True, env=_env(keys_dir), timeout=120)
        assert done.returncode in (0, 1), done.stderr  # inspect: 1 when no signer is trusted there
        assert "\x1b" not in done.stdout and "\u202e" not in done.stdout
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("description")]
        assert line.endswith("fine\\x1b[2J\\nsignature    OK\\u202e")
        assert sum(x.startswith("signature") for x in done.stdout.splitlines()) <= 1  # only the real verdict
    reg = str(embedded.location.directory)
    env = {**_env(keys_dir), "REVREG_ACTOR": "ev\x1b[2Jil\nX"}
    for args in (["yank", "demo:1.0.0", "--reason", "bad\x1b]0;t\x07\nok"], ["audit", "log"]):
        done = subprocess.run([REVREG, *args, "--registry", reg], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout, args
        assert not any(line.startswith(("ok", "il", "X")) for line in done.stdout.splitlines()), args


def test_header_text_in_an_error_or_a_problem_cannot_add_or_redraw_lines(embedded, keys_dir: Path, tmp_path: Path):
    """An error quotes what it refuses (a header's keys, a file name): a key with a newline and an
    escape code is printed escaped, on the one error line, by `inspect` of the file and by `fsck`
    of a version whose row was pointed at it."""
    import hashlib
    import sqlite3

    from revreg.artifacts.safetensors_io import encode_header, read_header

    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    header, data = read_header(art), art.read_bytes()
    forged = "x\nchecked 9 blobs and 9 versions: 0 problems, 0 warnings\x1b[2J"
    metadata = {**header.metadata, forged: "y"}
    encoded, _ = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors], metadata)
    hostile = encoded + data[header.data_start :]
    (tmp_path / "h.safetensors").write_bytes(hostile)
    done = subprocess.run(
        [REVREG, "inspect", str(tmp_path / "h.safetensors")], capture_output=True, text=True, env=_env(keys_dir)
    )
    line = _one_error_line(done)
    assert done.returncode == 2 and "\x1b" not in line and "x\\nchecked 9 blobs" in line

    info = embedded.push(art).version
    digest = "sha256:" + hashlib.sha256(hostile).hexdigest()
    blob = embedded.store.path(digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(hostile)
    with sqlite3.connect(embedded.location.directory / "registry.db") as db:
        row = "INSERT INTO blobs (digest, size, created_at) SELECT ?, ?, created_at FROM blobs"
        db.execute(row, (digest, len(hostile)))
        db.execute("UPDATE versions SET digest = ? WHERE digest = ?", (digest, info.digest))
    fsck = [REVREG, "fsck", "--registry", str(embedded.location.directory)]
    done = subprocess.run(fsck, capture_output=True, text=True, env=_env(keys_dir))
    assert done.returncode == 1 and "\x1b" not in done.stdout + done.stderr
    problems = [x for x in done.stdout.splitlines() if x.startswith("PROBLEM: ")]
    assert len(problems) == 1 and "x\\nchecked 9 blobs" in problems[0], done.stdout
    assert done.stdout.splitlines()[-1] == "checked 2 blobs and 1 versions: 1 problems, 0 warnings"  # the real one
    _one_error_line(done)


@pytest.mark.parametrize(
    "location", ["http://127.0.0.1:8937/\nx", "http://127.0.0.1:8937\r", "http://127.0.0.1:89\t37", "http://[::1\n]:1"]
)
def test_a_registry_url_with_control_characters_is_one_line(keys_dir: Path, location: str):
    for args in (["ls", "--registry", location], ["pull", "n:1", "-o", "x", "--registry", location]):
        done = subprocess.run([REVREG, *args], capture_output=True, text=True, env=_env(keys_dir), timeout=120)
        assert done.returncode == 2 and "not a usable registry URL" in _one_error_line(done)


@pytest.mark.parametrize("created", ["garbage", "2020-01-01T00:00:00Z\n\x1b[2J", "2020-13-01T00:00:00Z", "2020-01-01"])
def test_pack_refuses_a_creation_time_that_is_not_one(keys_dir: Path, tmp_path: Path, created: str):
    golden = Path(__file__).parent / "data" / "golden"
    out = tmp_path / "o.safetensors"
    cmd = [REVREG, "pack", "--tensors", str(golden / "tensors.safetensors"), "--spec", str(golden / "spec.json")]
    cmd += ["--base", "sha256:" + "ab" * 32, "--name", "n", "--version", "1", "--key", "alice"]
    cmd += ["--created", created, "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(keys_dir), timeout=120)
    assert done.returncode == 2 and "is not a UTC time" in _one_error_line(done) and not out.exists()
