"""`revreg serve` under hostile requests: refused before a byte of body is read, bounded for
chunked bodies, stalled bodies and parked uploads, and nothing staged or held afterwards.
Raw sockets on a real loopback server, so what is measured is what the server really reads."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from revreg.registry.service import Registry
from revreg.registry.tokens import Tokens
from tests.server_helpers import running


@pytest.fixture
def hostile(registry: Registry):
    t = Tokens(registry)
    tokens = {name: t.create(name, scopes)[0] for name, scopes in {"reader": ["read:*"], "ci": ["push:*"]}.items()}
    with running(registry, anonymous_read=True, read_timeout=1.0) as url:
        yield {"url": url, "tokens": tokens, "registry": registry}


def _send_head(url: str, head: str) -> tuple[socket.socket, float]:
    parts = urlsplit(url)
    s = socket.create_connection((parts.hostname, parts.port))
    s.sendall(head.replace("HOST", parts.netloc).encode())
    return s, time.monotonic()


def _status(s: socket.socket, timeout: float = 10) -> int:
    s.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1]) if data else 0


def _staging_empty(registry: Registry) -> bool:
    staging = registry.store.staging_dir
    return not staging.is_dir() or list(staging.iterdir()) == []


@pytest.mark.parametrize(
    ("auth", "expected"),
    [("", 401), ("Authorization: Bearer rvr_not-a-token\r\n", 401), ("READER", 403)],
)
def test_an_upload_is_refused_before_its_body_is_read(hostile, auth: str, expected: int):
    """The review's case: a read-only token (or none) made the server stage up to 64 GiB. Now
    the answer comes right after the headers: the promised gigabyte is never sent."""
    auth = auth.replace("READER", f"Authorization: Bearer {hostile['tokens']['reader']}\r\n")
    s, _ = _send_head(
        hostile["url"],
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: HOST\r\n{auth}X-Revreg-Name: demo\r\n"
        f"X-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: {1 << 30}\r\n\r\n",
    )
    assert _status(s) == expected
    assert _staging_empty(hostile["registry"])


def test_an_upload_must_name_what_it_pushes(hostile):
    s, _ = _send_head(
        hostile["url"],
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: HOST\r\nAuthorization: Bearer {hostile['tokens']['ci']}\r\n"
        f"X-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: 100\r\n\r\n",
    )
    assert _status(s) == 400


def test_a_json_body_is_never_read_for_an_unauthenticated_request(hostile):
    """300 parked connections with 1 MB of JSON each held memory: now each is answered at the
    headers and closed."""
    s, _ = _send_head(
        hostile["url"],
        "POST /v1/publish HTTP/1.1\r\nHost: HOST\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1 << 20}\r\n\r\n",
    )
    assert _status(s) == 401


def test_chunked_bodies_over_the_limit_get_413_not_500(hostile):
    token = hostile["tokens"]["ci"]
    big = (b"\0" * (1 << 20) for _ in range(80))  # 80 MiB, chunked, over the 64 MiB test limit
    response = httpx.put(
        f"{hostile['url']}/v1/artifacts",
        content=big,
        headers={"Authorization": f"Bearer {token}", "X-Revreg-Name": "demo", "X-Revreg-Digest": "sha256:" + "0" * 64},
    )
    assert response.status_code == 413
    json_big = httpx.post(
        f"{hostile['url']}/v1/publish",
        content=(b" " * (1 << 16) for _ in range(20)),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert json_big.status_code == 413
    time.sleep(0.2)
    assert _staging_empty(hostile["registry"])


def test_headers_over_16_kib_are_refused(hostile):
    response = httpx.get(
        f"{hostile['url']}/v1/versions",
        headers={"Authorization": f"Bearer {hostile['tokens']['reader']}", "X-Padding": "a" * 100_000},
    )
    assert response.status_code in (400, 431)


def test_a_stalled_body_is_cut_off_and_its_staging_file_released(hostile):
    s, _ = _send_head(
        hostile["url"],
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: HOST\r\nAuthorization: Bearer {hostile['tokens']['ci']}\r\n"
        f"X-Revreg-Name: demo\r\nX-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: 1000000\r\n\r\n",
    )
    s.sendall(b"\0" * 1000)  # then nothing: a slowloris upload
    assert _status(s, timeout=15) == 408
    deadline = time.monotonic() + 10
    while not _staging_empty(hostile["registry"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _staging_empty(hostile["registry"])


def test_parked_uploads_are_capped_per_token(hostile):
    from revreg.server.app import MAX_UPLOADS_PER_TOKEN

    head = (
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: HOST\r\nAuthorization: Bearer {hostile['tokens']['ci']}\r\n"
        f"X-Revreg-Name: demo\r\nX-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: 1000000\r\n\r\n"
    )
    parked = []
    for _ in range(MAX_UPLOADS_PER_TOKEN):
        s, _ = _send_head(hostile["url"], head)
        s.sendall(b"\0" * 100)
        parked.append(s)
    time.sleep(0.3)
    extra, _ = _send_head(hostile["url"], head)
    assert _status(extra) == 429
    for s in parked:
        s.close()


def test_remote_push_preflight_gives_a_clean_scope_error(hostile, keys_dir: Path, tmp_path: Path):
    from revreg.artifacts.keys import Keyring
    from revreg.registry.api import ScopeError
    from revreg.registry.remote import RemoteRegistry
    from tests.conftest import make_artifact

    hostile["registry"].trust_key(Keyring(keys_dir).public_pem("alice"), "alice", "publisher")
    art = make_artifact(tmp_path / "a.safetensors", keys_dir, size=1 << 20)
    with pytest.raises(ScopeError, match="has no push scope"):
        RemoteRegistry(hostile["url"], hostile["tokens"]["reader"]).push(art)
    pusher = RemoteRegistry(hostile["url"], hostile["tokens"]["ci"])
    assert pusher.push(art).created
    # Already stored: answered by the preflight, the body is not sent again.
    assert not pusher.push(art).created


def test_bad_input_to_the_json_api_is_4xx(hostile):
    """Each of the review's crashes (500 or traceback) is a clean 4xx now."""
    token = hostile["tokens"]["ci"]
    headers = {"Authorization": f"Bearer {token}"}
    admin = Tokens(hostile["registry"]).create("admin", ["admin:*"])[0]
    base = {"algorithm": "sha256", "chunk_size": 1 << 24}
    manifests = [
        {**base, "tensors": [{"name": "w", "dtype": "F32", "shape": [2], "nbytes": 8, "digest": "xyz"}]},
        {**base, "tensors": [{"name": 5, "dtype": "F32", "shape": [2], "nbytes": 8, "digest": "0" * 64}]},
        {**base, "tensors": [{"name": "w", "dtype": "F32", "shape": ["2"], "nbytes": 8, "digest": "0" * 64}]},
        {**base, "tensors": "nope"},
    ]
    for manifest in manifests:
        r = httpx.post(
            f"{hostile['url']}/v1/bases", json={"manifest": manifest}, headers={"Authorization": f"Bearer {admin}"}
        )
        assert 400 <= r.status_code < 500, (manifest, r.status_code, r.text)
    huge = b'{"ref": "demo:1.0.0", "reason": ' + b"9" * 5000 + b"}"
    r = httpx.post(f"{hostile['url']}/v1/yank", content=huge, headers={**headers, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500


def test_a_token_without_read_scope_is_refused_not_told_there_is_nothing(hostile):
    from revreg.registry.api import ScopeError
    from revreg.registry.remote import RemoteRegistry

    with pytest.raises(ScopeError, match="has no read scope"):
        RemoteRegistry(hostile["url"], hostile["tokens"]["ci"]).ls()


@pytest.mark.parametrize(("expires", "fragment"), [("0s", "positive duration"), ("3000000d", "past the year 9999")])
def test_token_lifetimes_that_cannot_be_are_refused(run, registry: Registry, expires: str, fragment: str):
    result = run("tokens", "create", "t", "--scope", "read:*", "--expires", expires, "--registry", registry.describe())
    assert result.exit_code == 2 and fragment in result.stderr
    assert Tokens(registry).list() == []


def test_a_trickling_body_under_the_minimum_rate_is_cut_off(registry: Registry):
    """A body that keeps arriving just before each read timeout still cannot hold an upload slot:
    under the minimum average rate it is answered 408 (rate and delay shortened for the test)."""
    secret = Tokens(registry).create("slow", ["push:*"])[0]
    with running(registry, read_timeout=5.0, min_rate=10_000, min_rate_after=0.5) as url:
        s, _ = _send_head(
            url,
            f"PUT /v1/artifacts HTTP/1.1\r\nHost: HOST\r\nAuthorization: Bearer {secret}\r\n"
            f"X-Revreg-Name: demo\r\nX-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: 1000000\r\n\r\n",
        )
        status = 0
        for _ in range(20):
            try:
                s.sendall(b"\0" * 10)
            except OSError:
                break
            time.sleep(0.1)
        status = _status(s, timeout=10)
        assert status == 408
        assert _staging_empty(registry)


# -- found by the second red-team round ---------------------------------------------------------
def test_a_duplicated_name_header_is_refused_before_the_body(hostile):
    s, _ = _send_head(
        hostile["url"],
        f"PUT /v1/artifacts HTTP/1.1\r\nHost: HOST\r\nAuthorization: Bearer {hostile['tokens']['ci']}\r\n"
        f"X-Revreg-Name: team-b\r\nX-Revreg-Name: team-a\r\nX-Revreg-Digest: sha256:{'0' * 64}\r\n"
        f"Content-Length: {1 << 30}\r\n\r\n",
    )
    assert _status(s) == 400


@pytest.mark.parametrize(
    "body",
    [
        b'{"ref": "\\ud800"}',
        b'{"ref": "demo:1.0.0", "reason": "\\udfff"}',
        b'{"ref": 1e999}',
        b'{"ref": "a", "ref": "b"}',
    ],
)
def test_json_bodies_that_cannot_be_text_are_4xx_not_500(hostile, body: bytes):
    headers = {"Authorization": f"Bearer {hostile['tokens']['reader']}", "Content-Type": "application/json"}
    for path in ("/v1/tags", "/v1/publish", "/v1/yank", "/v1/uploads/check"):
        r = httpx.post(f"{hostile['url']}{path}", content=body, headers=headers)
        assert 400 <= r.status_code < 500, (path, r.status_code)


def test_anonymous_readers_cannot_write_audit_rows_by_pulling_yanked_versions(hostile, keys_dir: Path, tmp_path: Path):
    from revreg.artifacts.keys import Keyring
    from tests.conftest import make_artifact

    registry = hostile["registry"]
    registry.trust_key(Keyring(keys_dir).public_pem("alice"), "alice", "publisher")
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    registry.yank("demo:1.0.0", "gone")
    rows = len(registry.audit_log())
    r = httpx.get(f"{hostile['url']}/v1/artifact", params={"ref": "demo:1.0.0", "allow_yanked": True})
    assert r.status_code == 401 and len(registry.audit_log()) == rows


def test_a_hostile_shape_is_a_clean_error():
    # Its cost (it is refused before any big product is formed) is in benchmarks/bench_parsers.py.
    from revreg.artifacts.safetensors_io import parse_header
    from revreg.errors import FormatError

    for shape in ("[" + ",".join(["2"] * 16000) + "]", "[" + ",".join(["9" * 60] * 100) + "]"):
        raw = ('{"t":{"dtype":"U8","shape":' + shape + ',"data_offsets":[0,8]}}').encode()
        with pytest.raises(FormatError):
            parse_header(len(raw).to_bytes(8, "little") + raw + b"\0" * 8, 16 + len(raw), "t")


@pytest.mark.parametrize(
    "tensors",
    [
        [],
        [{"name": "w", "dtype": "F32", "shape": [2], "nbytes": 8, "digest": "0" * 64}] * 2,
        [{"name": "w", "dtype": "X" * 100_000, "shape": [2], "nbytes": 8, "digest": "0" * 64}],
    ],
)
def test_degenerate_base_manifests_are_refused(hostile, tensors):
    admin = Tokens(hostile["registry"]).create("admin", ["admin:*"])[0]
    manifest = {"algorithm": "sha256", "chunk_size": 1 << 24, "tensors": tensors}
    r = httpx.post(
        f"{hostile['url']}/v1/bases", json={"manifest": manifest}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert 400 <= r.status_code < 500


def test_odd_entries_in_the_store_are_warnings_and_fsck_never_blocks(
    registry: Registry, keys_dir: Path, tmp_path: Path
):
    import os

    registry.store.staging_dir.mkdir(parents=True, exist_ok=True)
    os.mkfifo(registry.store.staging_dir / "evil.partial")  # open() on it would block forever
    (registry.store.staging_dir / "dir.partial").mkdir()
    hexname = "ab" * 32
    (registry.store.root / "sha256" / "ab" / hexname).mkdir(parents=True)
    (registry.store.root / "sha256" / "zz").mkdir()
    (registry.store.root / "sha256" / "zz" / ("cd" * 32)).write_bytes(b"misplaced")
    report = registry.fsck(prune=True, grace=0)
    assert report.problems == ()
    assert sum("stray object" in w for w in report.warnings) == 2


def test_prune_never_removes_a_fresh_copy_renamed_onto_an_old_orphan(
    registry: Registry, keys_dir: Path, tmp_path: Path
):
    """An old orphan (a push that crashed before its row) and the same bytes pushed again while
    fsck runs: whatever the interleaving, the acknowledged push keeps its blob."""
    import os

    from revreg.registry.store import abandoned, remove_if_same
    from tests.conftest import make_artifact

    registry.trust_key(
        __import__("revreg.artifacts.keys", fromlist=["Keyring"]).Keyring(keys_dir).public_pem("alice"),
        "alice",
        "publisher",
    )
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    with open(art, "rb") as src, registry.store.stage(src) as staged:
        registry.store.commit(staged)  # the crashed push's orphan
    digest = staged.digest
    path = registry.store.path(digest)
    os.utime(path, (0, 0))  # old enough for any grace
    with abandoned(path, grace=0) as claim:
        assert claim is not None
        assert registry.push(art).created  # the push renames a fresh copy onto the path and commits
        assert not remove_if_same(path, claim)  # fsck's deletion sees another inode and keeps it
    assert registry.store.exists(digest) and registry.fsck().problems == ()
