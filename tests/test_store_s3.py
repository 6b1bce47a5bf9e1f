"""The S3-compatible blob store against a local S3 server: same registry behavior as files."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import boto3
import pytest

from revreg.artifacts.keys import Keyring
from revreg.errors import IntegrityError
from revreg.registry.service import Registry
from revreg.registry.store_s3 import S3BlobStore
from tests.conftest import make_artifact
from tests.server_helpers import running


@pytest.fixture(params=["sqlite", "postgresql"])
def s3_registry(request, s3_bucket: str, keys_dir: Path, tmp_path: Path) -> Registry:
    location = str(tmp_path / "reg") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    reg = Registry.init(location, f"s3://{s3_bucket}/team/blobs", actor="tester")
    reg.trust_key(Keyring(keys_dir).public_pem("alice"), "alice", "publisher")
    yield reg
    reg.engine.dispose()


def test_push_and_pull_through_s3(s3_registry: Registry, keys_dir: Path, tmp_path: Path, s3_bucket: str):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    info = s3_registry.push(art).version
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"team/blobs/sha256/{info.digest[7:9]}/{info.digest[7:]}"]
    assert not s3_registry.push(art).created
    s3_registry.pull("demo:1.0.0", tmp_path / "out.safetensors", allow_unpublished=True)
    assert (tmp_path / "out.safetensors").read_bytes() == art.read_bytes()
    assert s3_registry.fsck().problems == ()
    assert list(s3_registry.store.staging_dir.iterdir()) == []


def test_tampered_object_is_caught_on_pull_and_by_fsck(
    s3_registry: Registry, keys_dir: Path, tmp_path: Path, s3_bucket: str
):
    info = s3_registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    key = f"team/blobs/sha256/{info.digest[7:9]}/{info.digest[7:]}"
    s3 = boto3.client("s3")
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[-1] ^= 1
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    with pytest.raises(IntegrityError, match="stored blob for demo:1.0.0 is corrupt"):
        s3_registry.pull("demo:1.0.0", tmp_path / "out.safetensors", allow_unpublished=True)
    assert not (tmp_path / "out.safetensors").exists()
    assert any("is corrupt" in p for p in s3_registry.fsck().problems)


def test_multipart_upload_and_conditional_create(s3_bucket: str, tmp_path: Path):
    store = S3BlobStore(s3_bucket, "mp", part_size=5 << 20, multipart_threshold=5 << 20)
    payload = os.urandom(12 << 20)
    with store.stage(io.BytesIO(payload)) as staged:
        store.commit(staged)
        store.commit(staged)  # a second writer of the same content: a no-op, not an error
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key=store.key(digest))
    assert head["ContentLength"] == len(payload) and head["ETag"].endswith('-3"')  # three parts
    with store.open(digest) as fh:
        assert fh.read() == payload
    assert list(store.digests()) == [digest]


def test_server_over_an_s3_store_streams_downloads(s3_registry: Registry, keys_dir: Path, tmp_path: Path):
    import httpx

    from revreg.registry.tokens import Tokens

    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    s3_registry.push(art)
    secret = Tokens(s3_registry).create("reader", ["read:*"])[0]
    with running(s3_registry) as url:
        response = httpx.get(
            f"{url}/v1/artifact",
            params={"ref": "demo:1.0.0", "allow_unpublished": True},
            headers={"Authorization": f"Bearer {secret}"},
        )
    assert response.status_code == 200 and response.content == art.read_bytes()


def test_unknown_store_url_is_refused(tmp_path: Path):
    with pytest.raises(Exception, match=r"use a directory or s3://bucket/prefix"):
        Registry.init(str(tmp_path / "reg"), "gs://bucket/x")


def test_a_stray_object_key_does_not_abort_fsck_and_young_orphans_stay(
    s3_registry: Registry, keys_dir: Path, tmp_path: Path, s3_bucket: str
):
    s3_registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="team/blobs/sha256/zz/README", Body=b"not a blob")
    orphan = make_artifact(tmp_path / "o.safetensors", keys_dir, seed=4)
    with open(orphan, "rb") as src, s3_registry.store.stage(src) as staged:
        s3_registry.store.commit(staged)
    report = s3_registry.fsck(prune=True)  # the orphan is seconds old: kept
    assert report.problems == () and any("stray object 'sha256:README'" in w for w in report.warnings)
    assert s3_registry.store.exists(staged.digest)
    s3_registry.fsck(prune=True, grace=0)
    assert not s3_registry.store.exists(staged.digest)
    assert s3_registry.fsck().problems == ()
