"""The registry service on SQLite and PostgreSQL: push, pull, lifecycle, trust, tags, audit, fsck."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from revreg.artifacts.attestation import sign_certification
from revreg.artifacts.keys import Keyring
from revreg.errors import InputError, IntegrityError, SignatureError
from revreg.registry.policy import GateError
from revreg.registry.service import ConflictError, NotFound, Registry, StateError
from tests.conftest import make_artifact, minimal_predicate


def certify(reg: Registry, keys_dir: Path, ref: str, verdict: str = "PASS", key: str = "vera") -> None:
    info = reg.resolve(ref)
    envelope = sign_certification(
        info.ref, info.digest, minimal_predicate(info.digest, verdict), Keyring(keys_dir).signer(key)
    )
    reg.record_certification(ref, envelope)


def test_push_then_pull_returns_the_same_bytes(registry: Registry, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    result = registry.push(art)
    assert result.created and result.version.state == "pending" and result.version.signer_name == "alice"
    out = tmp_path / "out.safetensors"
    registry.pull("demo:1.0.0", out, allow_unpublished=True)
    assert out.read_bytes() == art.read_bytes()


def test_same_bytes_again_is_a_no_op(registry: Registry, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    registry.push(art)
    rows = len(registry.audit_log())
    again = registry.push(art)
    assert not again.created and len(registry.audit_log()) == rows


def test_different_bytes_under_an_existing_version_is_a_conflict(registry: Registry, keys_dir: Path, tmp_path: Path):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir, seed=1))
    with pytest.raises(ConflictError, match="demo:1.0.0 already exists with digest sha256:"):
        registry.push(make_artifact(tmp_path / "b.safetensors", keys_dir, seed=2))
    assert len(registry.ls()) == 1


def test_push_refuses_an_untrusted_signer_and_stores_nothing(registry: Registry, keys_dir: Path, tmp_path: Path):
    Keyring(keys_dir).generate("mallory")
    art = make_artifact(tmp_path / "m.safetensors", keys_dir, key="mallory")
    with pytest.raises(SignatureError, match="unknown key .*: trust the signer with"):
        registry.push(art)
    assert registry.ls() == [] and list(registry.store.digests()) == []


def test_a_verifier_key_cannot_publish_artifacts(registry: Registry, keys_dir: Path, tmp_path: Path):
    with pytest.raises(SignatureError, match="unknown key"):
        registry.push(make_artifact(tmp_path / "v.safetensors", keys_dir, key="vera"))


def test_revoked_signer_is_refused_at_push_and_pull(registry: Registry, keys_dir: Path, tmp_path: Path):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    registry.revoke_key("alice", "laptop stolen")
    with pytest.raises(SignatureError, match="signed by revoked key alice .*: laptop stolen"):
        registry.push(make_artifact(tmp_path / "b.safetensors", keys_dir, "2.0.0"))
    assert registry.ls()[0].signer_revoked
    with pytest.raises(SignatureError, match="revoked key alice"):
        registry.pull("demo:1.0.0", tmp_path / "out.safetensors", allow_unpublished=True)
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ConflictError, match="revocation is permanent"):
        registry.trust_key(Keyring(keys_dir).public_pem("alice"), "alice", "publisher")


def test_lifecycle_publish_needs_a_passing_certification(registry: Registry, keys_dir: Path, tmp_path: Path):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    with pytest.raises(StateError, match="demo:1.0.0 is pending; only a certified version can be published"):
        registry.publish("demo:1.0.0")
    with pytest.raises(StateError, match="is pending, not published"):
        registry.pull("demo:1.0.0", tmp_path / "o.safetensors")
    certify(registry, keys_dir, "demo:1.0.0", "FAIL")
    assert registry.resolve("demo:1.0.0").state == "rejected"
    with pytest.raises(StateError, match="rejected"):
        registry.publish("demo:1.0.0")
    certify(registry, keys_dir, "demo:1.0.0", "PASS")
    assert registry.publish("demo:1.0.0").state == "published"
    rows = len(registry.audit_log())
    assert registry.publish("demo:1.0.0").state == "published"  # a retried publish is a no-op
    assert len(registry.audit_log()) == rows
    registry.pull("demo", tmp_path / "o.safetensors")
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert registry.yank("demo:1.0.0", "bad outputs").state == "yanked"
    with pytest.raises(StateError, match="yanked; it cannot become published"):
        registry.publish("demo:1.0.0")
    with pytest.raises(StateError, match=r"was yanked \(bad outputs\); pass --allow-yanked"):
        registry.pull("demo:1.0.0", tmp_path / "p.safetensors")


def test_certification_must_come_from_a_verifier_key_about_this_digest(
    registry: Registry, keys_dir: Path, tmp_path: Path
):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    info = registry.resolve("demo:1.0.0")
    by_publisher = sign_certification(
        info.ref, info.digest, minimal_predicate(info.digest), Keyring(keys_dir).signer("alice")
    )
    with pytest.raises(SignatureError, match="unknown key"):
        registry.record_certification("demo:1.0.0", by_publisher)
    other = sign_certification(
        info.ref, "sha256:" + "0" * 64, minimal_predicate("sha256:" + "0" * 64), Keyring(keys_dir).signer("vera")
    )
    with pytest.raises(IntegrityError, match="about sha256:0000"):
        registry.record_certification("demo:1.0.0", other)
    assert registry.resolve("demo:1.0.0").state == "pending"


def test_revoking_the_verifier_withdraws_its_certifications(registry: Registry, keys_dir: Path, tmp_path: Path):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    certify(registry, keys_dir, "demo:1.0.0")
    registry.publish("demo:1.0.0")
    registry.revoke_key("vera", "compromised")
    with pytest.raises(GateError, match="has no certification by a trusted verifier key"):
        registry.pull("demo:1.0.0", tmp_path / "o.safetensors")


def test_tags_resolve_and_move(registry: Registry, keys_dir: Path, tmp_path: Path):
    for v in ("1.0.0", "1.1.0"):
        registry.push(make_artifact(tmp_path / f"{v}.safetensors", keys_dir, v, seed=hash(v) % 100))
    registry.tag("demo:1.0.0", "stable")
    assert registry.resolve("demo:stable").version == "1.0.0"
    registry.tag("demo:1.1.0", "stable")
    assert registry.resolve("demo:stable").version == "1.1.0"
    assert registry.audit_log("demo:stable")[-1].details == {"version": "1.1.0", "previous": "1.0.0"}
    with pytest.raises(Exception, match="is a version of demo; a tag cannot shadow it"):
        registry.tag("demo:1.1.0", "1.0.0")
    digest = registry.resolve("demo:1.0.0").digest
    assert registry.resolve(f"demo@{digest}").version == "1.0.0"


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "x\x00y", "UPPER", "name\n", "demo:bad/ver"])
def test_names_with_separators_or_control_characters_are_refused(registry: Registry, bad: str):
    with pytest.raises(Exception, match="invalid|control characters"):
        registry.resolve(bad)


def test_unknown_name_and_version_are_named(registry: Registry, keys_dir: Path, tmp_path: Path):
    with pytest.raises(NotFound, match="no behavior named 'nope'"):
        registry.resolve("nope:1")
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    with pytest.raises(NotFound, match="no version demo:9.9"):
        registry.resolve("demo:9.9")


def _pull_is_refused(registry: Registry, tmp_path: Path, match: str) -> None:
    """demo:1.0.0's pull fails its checks and leaves neither the output nor a partial file."""
    out = tmp_path / "out.safetensors"
    with pytest.raises(IntegrityError, match=match):
        registry.pull("demo:1.0.0", out, allow_unpublished=True)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_pull_detects_a_tampered_blob_and_writes_nothing(registry: Registry, keys_dir: Path, tmp_path: Path):
    info = registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    blob = registry.store.path(info.digest)
    data = bytearray(blob.read_bytes())
    data[-2] ^= 0x10
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    _pull_is_refused(registry, tmp_path, "stored blob for demo:1.0.0 is corrupt")
    report = registry.fsck()
    assert len(report.problems) == 1 and f"blob {info.digest} is corrupt" in report.problems[0]


def test_fsck_prune_never_takes_a_blob_a_live_push_holds(registry: Registry, keys_dir: Path, tmp_path: Path):
    """The review's race, made deterministic: the push's blob is in place, its row not yet
    committed, and fsck --prune runs with no grace at all. The writer's lock keeps the blob."""
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    with open(art, "rb") as src, registry.store.stage(src) as staged:
        registry.store.commit(staged)  # renamed into place: exactly the window the review hit
        for _ in range(2):
            report = registry.fsck(prune=True, grace=0)
            assert registry.store.exists(staged.digest), report.warnings
        assert any("in use, kept" in w for w in report.warnings)
    assert registry.push(art).created
    assert registry.fsck(prune=True, grace=0).problems == ()
    registry.pull("demo:1.0.0", tmp_path / "o.safetensors", allow_unpublished=True)


def test_a_push_whose_blob_vanished_writes_it_again(registry: Registry, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    info = registry.push(art).version
    registry.store.remove(info.digest)  # lost (an older revreg's prune, a disk fault)
    assert any("has no file" in p for p in registry.fsck().problems)
    again = registry.push(art)
    assert not again.created and registry.store.exists(info.digest)
    assert registry.fsck().problems == ()
    assert registry.audit_log(info.ref)[-1].action == "blob.restore"
    registry.pull(info.ref, tmp_path / "o.safetensors", allow_unpublished=True)


def test_fsck_finds_missing_blobs_and_prunes_orphans(registry: Registry, keys_dir: Path, tmp_path: Path):
    info = registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    assert registry.fsck().problems == ()
    orphan = make_artifact(tmp_path / "o.safetensors", keys_dir, seed=5)
    with open(orphan, "rb") as src, registry.store.stage(src) as staged:
        registry.store.commit(staged)
    report = registry.fsck()
    assert report.problems == () and any("has no row" in w for w in report.warnings)
    kept = registry.fsck(prune=True)  # younger than the default grace period: it may be a push in flight
    assert any("younger than the grace period or in use, kept" in w for w in kept.warnings)
    assert any("has no row" in w for w in registry.fsck().warnings)
    registry.fsck(prune=True, grace=0)  # abandoned: no writer holds it
    assert registry.fsck().warnings == ()
    registry.store.path(info.digest).unlink()
    assert any(f"blob row {info.digest} has no file" in p for p in registry.fsck().problems)


def test_fsck_reads_each_version_as_a_pull_would(registry: Registry, keys_dir: Path, tmp_path: Path, toy: dict):
    """A version whose row points at a sound blob that is not its artifact (another version's,
    or a probe set's) passes the hash check but not a pull: fsck names it."""
    one = registry.push(make_artifact(tmp_path / "1.safetensors", keys_dir, "1.0.0", seed=1)).version
    two = registry.push(make_artifact(tmp_path / "2.safetensors", keys_dir, "2.0.0", seed=2)).version
    probes = registry.push_probes(toy["probes"])[0]
    assert registry.fsck().problems == ()
    _sql(registry, f"UPDATE versions SET digest = '{two.digest}' WHERE digest = '{one.digest}'")
    assert registry.fsck().problems == (f"version demo:1.0.0 ({two.digest}) holds an artifact signed as demo:2.0.0",)
    _sql(registry, f"UPDATE versions SET digest = '{probes.digest}' WHERE digest = '{two.digest}'")
    problems = registry.fsck().problems
    assert len(problems) == 2 and all("is not an artifact a pull would accept" in p for p in problems), problems


def test_pull_as_peft_writes_an_adapter_directory(registry: Registry, run, artifact: Path, tmp_path: Path):
    registry.push(artifact)
    registry.pull("demo:1.0.0", tmp_path / "adapter", fmt="peft", allow_unpublished=True)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def _sql(reg: Registry, statement: str) -> None:
    with reg.engine.begin() as conn:
        conn.execute(text(statement))


def _history(registry: Registry, keys_dir: Path, tmp_path: Path) -> None:
    for v in ("1", "2", "3"):
        registry.push(make_artifact(tmp_path / f"{v}.safetensors", keys_dir, v, seed=int(v)))
    assert registry.audit_verify().ok


def test_audit_verify_names_an_edited_row(registry: Registry, keys_dir: Path, tmp_path: Path):
    _history(registry, keys_dir, tmp_path)
    _sql(registry, "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 4")
    verdict = registry.audit_verify()
    assert not verdict.ok and verdict.problem.startswith("row 4 (version.push demo:1) was edited")


def test_audit_verify_names_a_deleted_row(registry: Registry, keys_dir: Path, tmp_path: Path):
    _history(registry, keys_dir, tmp_path)
    _sql(registry, "DELETE FROM audit_log WHERE seq = 5")
    assert registry.audit_verify().problem == "row 5 is missing (deleted); the next row is 6"


def test_audit_verify_names_reordered_rows(registry: Registry, keys_dir: Path, tmp_path: Path):
    _history(registry, keys_dir, tmp_path)
    _sql(registry, "UPDATE audit_log SET seq = 100 WHERE seq = 5")
    _sql(registry, "UPDATE audit_log SET seq = 5 WHERE seq = 6")
    _sql(registry, "UPDATE audit_log SET seq = 6 WHERE seq = 100")
    assert registry.audit_verify().problem == "row 5 does not follow row 4 (reordered or replaced)"


def test_audit_verify_notices_rows_deleted_from_the_end(registry: Registry, keys_dir: Path, tmp_path: Path):
    _history(registry, keys_dir, tmp_path)
    _sql(registry, "DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)")
    assert "rows deleted from the end" in registry.audit_verify().problem


def test_register_base_records_identity_and_manifest(registry: Registry, gpt2_dir: Path):
    info, created = registry.register_base(gpt2_dir, "tiny-gpt2")
    again, created_again = registry.register_base(gpt2_dir / "model.safetensors")
    assert created and not created_again and again.identity == info.identity
    assert registry.bases()[0].name == "tiny-gpt2"


def test_embedded_registry_uses_wal_and_foreign_keys(tmp_path: Path):
    reg = Registry.init(str(tmp_path / "r"))
    with reg.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


@pytest.mark.parametrize(
    "damage",
    ["append", "header_length", "manifest_byte", "truncate_header", "empty"],
)
def test_pull_of_a_blob_damaged_anywhere_is_corruption_not_bad_input(
    registry: Registry, keys_dir: Path, tmp_path: Path, damage: str
):
    """The header is now parsed as the blob streams; damage there is still the registry's
    corruption (IntegrityError, exit 1, with the fsck hint), never the user's bad input."""
    import struct

    info = registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    blob = registry.store.path(info.digest)
    data = bytearray(blob.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if damage == "append":
        data += b"\0"
    elif damage == "header_length":
        data[:8] = struct.pack("<Q", 1 << 30)
    elif damage == "manifest_byte":
        data[8 + n // 2] ^= 0x01
    elif damage == "truncate_header":
        data = data[: 8 + n // 2]
    else:
        data = bytearray()
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    _pull_is_refused(registry, tmp_path, "stored blob for demo:1.0.0 is corrupt.*run `revreg fsck`")


def test_a_push_from_a_pipe_is_checked_as_it_streams(registry: Registry, keys_dir: Path, tmp_path: Path):
    import os
    import threading

    art = make_artifact(tmp_path / "a.safetensors", keys_dir).read_bytes()
    for payload, ok in ((art, True), (art[: len(art) // 2], False), (art[:-1] + bytes([art[-1] ^ 1]), False)):
        read_end, write_end = os.pipe()
        writer = threading.Thread(target=lambda p=payload, w=write_end: (os.write(w, p), os.close(w)))
        writer.start()
        try:
            if ok:
                assert registry.push(Path(f"/dev/fd/{read_end}")).version.ref == "demo:1.0.0"
            else:
                with pytest.raises((IntegrityError, InputError)):
                    registry.push(Path(f"/dev/fd/{read_end}"))
        finally:
            writer.join()
            os.close(read_end)
    assert [v.ref for v in registry.ls()] == ["demo:1.0.0"]
    assert list(registry.store.staging_dir.iterdir()) == []


@pytest.mark.parametrize("planted", ["directory", "fifo", "symlink"])
def test_pull_of_a_blob_that_is_not_a_file_is_corruption_and_never_hangs(
    registry: Registry, keys_dir: Path, tmp_path: Path, planted: str
):
    import os

    info = registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    blob = registry.store.path(info.digest)
    copy = tmp_path / "real"
    copy.write_bytes(blob.read_bytes())
    blob.unlink()
    if planted == "directory":
        blob.mkdir()
    elif planted == "fifo":
        os.mkfifo(blob)
    else:
        blob.symlink_to(copy)
    _pull_is_refused(registry, tmp_path, "run `revreg fsck`")


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_push_puts_back_a_blob_something_else_replaced(
    registry: Registry, keys_dir: Path, tmp_path: Path, planted: str
):
    """fsck names the hole, and a push of the same bytes fills it: a link (even to the right
    bytes) or a directory where the blob belongs is not the blob."""
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    info = registry.push(art).version
    blob = registry.store.path(info.digest)
    blob.unlink()
    if planted == "directory":
        blob.mkdir()
    else:
        (tmp_path / "copy").write_bytes(art.read_bytes())
        blob.symlink_to(tmp_path / "copy")
    report = registry.fsck()
    assert any(info.digest in p for p in report.problems), report
    assert not registry.push(art).created
    assert blob.is_file() and not blob.is_symlink() and blob.read_bytes() == art.read_bytes()
    out = tmp_path / "out.safetensors"
    registry.pull("demo:1.0.0", out, allow_unpublished=True)
    assert out.read_bytes() == art.read_bytes()


def test_a_push_refused_for_shadowing_a_tag_leaves_no_blob(registry: Registry, keys_dir: Path, tmp_path: Path):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    registry.tag("demo:1.0.0", "2.0.0")
    before = set(registry.store.digests())
    with pytest.raises(StateError, match="would shadow the tag"):
        registry.push(make_artifact(tmp_path / "b.safetensors", keys_dir, "2.0.0", seed=1))
    assert set(registry.store.digests()) == before and registry.fsck().warnings == ()


def test_a_stored_blob_damaged_in_its_signature_is_corruption(registry: Registry, keys_dir: Path, tmp_path: Path):
    """Whichever header bytes the damage hits (here the signature), a blob that is not the
    recorded one is reported as corrupt, with the fsck hint."""
    info = registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    blob = registry.store.path(info.digest)
    data = bytearray(blob.read_bytes())
    at = data.index(b'sig\\":\\"') + 12  # inside the signature's base64, in the JSON-quoted envelope
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    _pull_is_refused(registry, tmp_path, "stored blob for demo:1.0.0 is corrupt.*run `revreg fsck`")


def test_a_blob_folder_replaced_by_a_file_is_reported_and_repaired(registry: Registry, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    info = registry.push(art).version
    folder = registry.store.path(info.digest).parent
    shutil.rmtree(folder)
    folder.write_bytes(b"not a folder")
    assert any("has no file in the store" in p for p in registry.fsck().problems)
    assert not registry.push(art).created
    assert registry.fsck().problems == ()
    staging = registry.store.staging_dir
    shutil.rmtree(staging)
    staging.write_bytes(b"not a folder")
    with pytest.raises(IntegrityError, match="is not a directory"):
        registry.push(make_artifact(tmp_path / "b.safetensors", keys_dir, "1.0.1", seed=1))


def _point_version_at(registry: Registry, version: str, data: bytes, size: int | None = None) -> None:
    """A blob of `data` in the store, sound by its sha256, with `version`'s row pointed at it."""
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = registry.store.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    _sql(
        registry,
        f"INSERT INTO blobs (digest, size, created_at) SELECT '{digest}', {len(data)}, created_at FROM blobs LIMIT 1",
    )
    _sql(
        registry,
        f"UPDATE versions SET digest = '{digest}'"
        + (f", size = {size}" if size else "")
        + f" WHERE version = '{version}'",
    )


@pytest.mark.parametrize("tensor_hash", ["blake3", "sha256"])
def test_fsck_checks_a_version_blob_as_a_pull_does(registry: Registry, keys_dir: Path, tmp_path: Path, tensor_hash):
    """A blob whose file digest is right but whose tensors do not match its signed digest, or
    another signing of the same version (another manifest, the row's size given too), is a
    problem: pull refuses both, so fsck must not call them sound."""
    art = make_artifact(tmp_path / "a.safetensors", keys_dir, tensor_hash=tensor_hash)
    registry.push(art)
    tampered = bytearray(art.read_bytes())
    tampered[-1] ^= 1
    _point_version_at(registry, "1.0.0", bytes(tampered))
    (problem,) = registry.fsck().problems
    assert "is not an artifact a pull would accept" in problem and "do not match the signed manifest" in problem
    other = make_artifact(tmp_path / "b.safetensors", keys_dir, tensor_hash=tensor_hash, description="other")
    _point_version_at(registry, "1.0.0", other.read_bytes(), size=other.stat().st_size)
    problems = registry.fsck().problems
    where = f"version demo:1.0.0 ({registry.resolve('demo:1.0.0').digest})"
    assert problems == (f"{where} holds another artifact than its row records (another manifest or size)",), problems
