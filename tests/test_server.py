"""`revreg serve` on loopback: the CLI's verbs remote, authentication and scopes, streaming
uploads and downloads, limits and faults. Real HTTP, real registries."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import text

from revreg.artifacts.keys import Keyring
from revreg.errors import RevregError
from revreg.registry.api import ConflictError
from revreg.registry.service import Registry
from revreg.registry.tokens import Tokens
from tests.conftest import make_artifact
from tests.server_helpers import running

ROOT = Path(__file__).resolve().parents[1]
TOY = "revreg.verifier.toy:build"


@pytest.fixture
def served(registry: Registry, keys_dir: Path):
    """A server over the SQLite and PostgreSQL registries, with tokens of several kinds."""
    t = Tokens(registry)
    secrets = {
        name: t.create(name, scopes)[0]
        for name, scopes in {
            "admin": ["admin:*"],
            "reader": ["read:*"],
            "team-a": ["read:team-a", "push:team-a"],
            "ci": ["read:*", "push:*", "certify:*", "publish:*"],
        }.items()
    }
    secrets["expired"] = t.create("expired", ["read:*"], timedelta(hours=1))[0]
    with registry.engine.begin() as conn:  # an hour later, as far as the token is concerned
        conn.execute(
            text("UPDATE tokens SET expires_at = :t WHERE name = 'expired'"),
            {"t": datetime.now(UTC) - timedelta(seconds=1)},
        )
    secrets["revoked"] = t.create("revoked", ["read:*"])[0]
    t.revoke("revoked")
    with running(registry, max_upload=8 << 20) as url:
        yield {"url": url, "tokens": secrets, "registry": registry}


def _as(run, served, token: str):
    def call(*args):
        return run(*args, "--registry", served["url"], env={"REVREG_TOKEN": served["tokens"][token]})

    return call


def test_remote_lifecycle_through_the_cli(run, served, toy, keys_dir: Path, tmp_path: Path):
    admin, ci = _as(run, served, "admin"), _as(run, served, "ci")
    Keyring(keys_dir).generate("val")
    assert admin("keys", "trust", "val", "--role", "verifier").exit_code == 0
    assert "val " in admin("keys", "trusted").stdout
    refused = ci("keys", "trust", "val", "--role", "publisher")
    assert refused.exit_code == 2 and "has no admin scope" in refused.stderr
    assert ci("push", toy["artifact"]).exit_code == 0
    assert "already present" in ci("push", toy["artifact"]).stdout
    assert ci("probes", "push", toy["probes"]).exit_code == 0
    assert ci("base", "register", toy["base"], "--name", "toy").exit_code == 0
    certified = ci(
        "certify",
        "toy:1.0.0",
        "--base",
        toy["base"],
        "--factory",
        TOY,
        "--probes",
        "toy-probes",
        "--key",
        "vera",
        "--baseline",
        "merge",
    )
    assert certified.exit_code == 0, certified.output
    assert "toy:1.0.0 is now certified" in certified.stdout
    assert ci("publish", "toy:1.0.0").exit_code == 0
    assert ci("tag", "toy:1.0.0", "stable").exit_code == 0
    listing = json.loads(ci("ls", "--json").stdout)
    assert [(v["name"], v["state"], v["tags"]) for v in listing] == [("toy", "published", ["stable"])]
    shown = json.loads(ci("show", "toy:stable", "--json").stdout)
    assert shown["base_registered"] and len(shown["certifications"]) == 1
    out = tmp_path / "pulled.safetensors"
    assert ci("pull", "toy:stable", "-o", out).exit_code == 0
    assert out.read_bytes() == toy["artifact"].read_bytes()
    (tmp_path / "policy.toml").write_text('[policy]\nverifiers = ["vera"]\nmin_cycles = 3\nbitwise = true\n')
    assert ci("gate", "toy:1.0.0", "--policy", tmp_path / "policy.toml").exit_code == 0
    assert "chain intact" in ci("audit", "verify").stdout
    assert ci("audit", "report", "-o", tmp_path / "r.json").exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["versions"] == 1
    assert ci("yank", "toy:1.0.0", "--reason", "superseded").exit_code == 0
    # The server records who did what: the token's name is the actor.
    actors = {e.action: e.actor for e in served["registry"].audit_log()}
    assert actors["version.push"] == "token:ci" and actors["version.yank"] == "token:ci"
    assert admin("fsck").exit_code == 0


@pytest.mark.parametrize(
    ("token", "status", "fragment"),
    [
        (None, 401, "authentication required"),
        ("rvr_not-a-real-token", 401, "unknown token"),
        ("expired", 401, "expired at"),
        ("revoked", 401, "was revoked"),
    ],
)
def test_bad_tokens_get_401(served, token, status, fragment):
    secret = served["tokens"].get(token, token)
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    response = httpx.get(f"{served['url']}/v1/versions", headers=headers)
    assert response.status_code == status and fragment in response.json()["error"]["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_scopes_cover_namespaces(run, served, keys_dir: Path, tmp_path: Path):
    team_a, reader = _as(run, served, "team-a"), _as(run, served, "reader")
    ok = team_a("push", make_artifact(tmp_path / "a.safetensors", keys_dir, name="team-a.tone"))
    assert ok.exit_code == 0, ok.output
    other = team_a("push", make_artifact(tmp_path / "b.safetensors", keys_dir, name="team-b.tone"))
    assert other.exit_code == 2 and "has no push scope on namespace 'team-b'" in other.stderr
    assert "HTTP 403" in other.stderr
    assert reader("push", tmp_path / "a.safetensors").exit_code == 2
    assert "team-a.tone:1.0.0" in reader("ls").stdout
    assert reader("publish", "team-a.tone:1.0.0").exit_code == 2
    assert [v.name for v in served["registry"].ls()] == ["team-a.tone"]


def test_anonymous_read_only_when_configured(registry: Registry, keys_dir: Path, tmp_path: Path):
    registry.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    with running(registry, anonymous_read=True) as url:
        assert httpx.get(f"{url}/v1/versions").status_code == 200
        assert (
            httpx.post(f"{url}/v1/publish", json={"ref": "demo:1.0.0"}).status_code == 401
        )  # writes need a token, answered before the body
    with running(registry) as url:
        assert httpx.get(f"{url}/v1/versions").status_code == 401


def _raw_upload(url: str, token: str, head_length: int, body: bytes) -> bytes:
    """Send a PUT whose Content-Length promises more than is sent, then hang up."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as s:
        s.sendall(
            (
                f"PUT /v1/artifacts HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
                f"X-Revreg-Name: demo\r\nX-Revreg-Digest: sha256:{'0' * 64}\r\nContent-Length: {head_length}\r\n\r\n"
            ).encode()
            + body
        )
        s.shutdown(socket.SHUT_WR)
        # The server's answer (or its close) means it has dealt with the upload, its staging file
        # included. A 10 s wait once ran out on a loaded CI machine before the server had even
        # created that file, and the check below caught it being created.
        s.settimeout(120)
        try:
            return s.recv(65536)
        except OSError:
            return b""


def _nothing_stored(registry: Registry) -> None:
    # The server notices a client that hung up asynchronously; give it a moment to clean up.
    deadline = time.monotonic() + 10
    while list(registry.store.staging_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(registry.store.staging_dir.iterdir()) == []
    assert registry.ls() == [] and list(registry.store.digests()) == []


def test_truncated_upload_stores_nothing(served, keys_dir: Path, tmp_path: Path):
    data = make_artifact(tmp_path / "a.safetensors", keys_dir).read_bytes()
    _raw_upload(served["url"], served["tokens"]["ci"], len(data), data[: len(data) // 2])
    _nothing_stored(served["registry"])
    # The same push then succeeds in full.
    done = httpx.put(
        f"{served['url']}/v1/artifacts",
        content=data,
        headers={
            "Authorization": f"Bearer {served['tokens']['ci']}",
            "X-Revreg-Digest": "sha256:" + __import__("hashlib").sha256(data).hexdigest(),
            "X-Revreg-Name": "demo",
        },
    )
    assert done.status_code == 200 and done.json()["created"]


def test_digest_mismatch_is_refused_before_anything_is_visible(served, keys_dir: Path, tmp_path: Path):
    data = make_artifact(tmp_path / "a.safetensors", keys_dir).read_bytes()
    response = httpx.put(
        f"{served['url']}/v1/artifacts",
        content=data,
        headers={
            "Authorization": f"Bearer {served['tokens']['ci']}",
            "X-Revreg-Digest": "sha256:" + "0" * 64,
            "X-Revreg-Name": "demo",
        },
    )
    assert response.status_code == 400 and "upload digest mismatch" in response.json()["error"]["message"]
    _nothing_stored(served["registry"])


def test_body_over_the_limit_gets_413(served):
    headers = {
        "Authorization": f"Bearer {served['tokens']['ci']}",
        "X-Revreg-Digest": "sha256:" + "0" * 64,
        "X-Revreg-Name": "demo",
    }
    too_big = httpx.put(f"{served['url']}/v1/artifacts", content=b"\0" * (9 << 20), headers=headers)
    assert too_big.status_code == 413
    json_too_big = httpx.post(
        f"{served['url']}/v1/publish",
        content=b'{"ref":"' + b"a" * (2 << 20) + b'"}',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert json_too_big.status_code == 413
    _nothing_stored(served["registry"])


def test_malformed_json_gets_422(served):
    headers = {"Authorization": f"Bearer {served['tokens']['ci']}", "Content-Type": "application/json"}
    assert httpx.post(f"{served['url']}/v1/publish", content=b"{not json", headers=headers).status_code == 422
    assert httpx.post(f"{served['url']}/v1/yank", json={"ref": "x:1"}, headers=headers).status_code == 422


def test_downloads_support_range_requests(served, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir, size=4096)
    served["registry"].push(art)
    headers = {"Authorization": f"Bearer {served['tokens']['reader']}", "Range": "bytes=100-"}
    response = httpx.get(
        f"{served['url']}/v1/artifact", params={"ref": "demo:1.0.0", "allow_unpublished": True}, headers=headers
    )
    assert response.status_code == 206 and response.content == art.read_bytes()[100:]
    assert response.headers["content-range"].startswith("bytes 100-")


def test_unpublished_versions_stay_on_the_server(served, keys_dir: Path, tmp_path: Path):
    served["registry"].push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    response = httpx.get(
        f"{served['url']}/v1/artifact",
        params={"ref": "demo:1.0.0"},
        headers={"Authorization": f"Bearer {served['tokens']['reader']}"},
    )
    assert response.status_code == 409 and "not published" in response.json()["error"]["message"]


def test_plain_http_is_for_loopback_only(run):
    result = run("ls", "--registry", "http://registry.example.com:8470")
    assert result.exit_code == 2 and "plain http:// is allowed on loopback only" in result.stderr


def test_server_side_commands_refuse_a_url(run):
    for args in (("init",), ("db", "upgrade"), ("tokens", "list")):
        result = run(*args, "--registry", "http://127.0.0.1:9")
        assert result.exit_code == 2 and "run it on the server" in result.stderr


def test_published_openapi_document_is_current(registry: Registry):
    from revreg.server.app import create_app

    published = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert published == json.loads(json.dumps(create_app(registry).openapi()))


def _tampered(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor byte
    return bytes(data)


def test_uploads_without_a_declared_digest_are_checked_as_fully(served, keys_dir: Path, tmp_path: Path):
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    headers = {"Authorization": f"Bearer {served['tokens']['ci']}", "X-Revreg-Name": "demo"}
    bad = httpx.put(f"{served['url']}/v1/artifacts", content=_tampered(art), headers=headers)
    assert bad.status_code == 400 and "do not match the signed manifest" in bad.json()["error"]["message"]
    _nothing_stored(served["registry"])
    Keyring(keys_dir).generate("nobody-trusts-me")
    unsigned = make_artifact(tmp_path / "e.safetensors", keys_dir, key="nobody-trusts-me")
    refused = httpx.put(f"{served['url']}/v1/artifacts", content=unsigned.read_bytes(), headers=headers)
    assert refused.status_code >= 400 and refused.status_code != 500
    _nothing_stored(served["registry"])
    good = httpx.put(f"{served['url']}/v1/artifacts", content=art.read_bytes(), headers=headers)
    assert good.status_code == 200 and good.json()["created"]
    assert good.json()["version"]["digest"] == "sha256:" + __import__("hashlib").sha256(art.read_bytes()).hexdigest()


def _two_tensor_artifact(path: Path, keys_dir: Path) -> Path:
    import numpy as np

    from revreg.artifacts.artifact import Attachment, pack
    from tests.conftest import CREATED

    rng = np.random.default_rng(7)
    pack(
        path,
        {
            "h.0.steer_vector": ("F32", (8,), rng.standard_normal(8).astype("<f4").tobytes()),
            "h.1.steer_vector": ("F32", (5,), rng.standard_normal(5).astype("<f4").tobytes()),
        },
        tuple(Attachment(f"h.{i}", "steer", {"vector": f"h.{i}.steer_vector"}) for i in range(2)),
        name="demo",
        version="1.0.0",
        base="sha256:" + "ab" * 32,
        signer=Keyring(keys_dir).signer("alice"),
        created=CREATED,
    )
    return path


def test_an_upload_damaged_anywhere_is_refused_and_nothing_stored(served, keys_dir: Path, tmp_path: Path):
    """Damage on the way, wherever it falls (length prefix, header JSON and its padding, each
    tensor's first and last byte) and a byte more or less: each refused with a 4xx, nothing
    stored; the intact file is then stored under its own sha256. (Another valid signature over
    the same manifest is not damage: the client's own digest catches that, below.)"""
    import hashlib

    from revreg.artifacts.safetensors_io import read_header

    art = _two_tensor_artifact(tmp_path / "a.safetensors", keys_dir)
    good = art.read_bytes()
    header = read_header(art)
    start = header.data_start
    places = {0, 7, 8, 9, start // 2, start - 2, start - 1, len(good) - 1}
    for t in header.tensors:
        places |= {start + t.start, start + t.end - 1}
    variants = {f"byte {at} ^ {bit:#x}": at for at in sorted(places) for bit in (0x01, 0x20, 0x80)}
    headers = {"Authorization": f"Bearer {served['tokens']['ci']}", "X-Revreg-Name": "demo"}
    bodies = {label: bytearray(good) for label in variants}
    for label, at in variants.items():
        bodies[label][at] ^= int(label.rsplit(" ", 1)[1], 16)
    bodies["one byte more"] = bytearray(good + b"\0")
    bodies["one byte less"] = bytearray(good[:-1])
    bodies["a padding space made a tab"] = bytearray(good)
    assert good[start - 1 : start] == b" ", "the test needs a padded header"
    bodies["a padding space made a tab"][start - 1] = 0x09
    for label, body in bodies.items():
        r = httpx.put(f"{served['url']}/v1/artifacts", content=bytes(body), headers=headers)
        assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
        _nothing_stored(served["registry"])
    ok = httpx.put(f"{served['url']}/v1/artifacts", content=good, headers=headers)
    assert ok.status_code == 200
    assert ok.json()["version"]["digest"] == "sha256:" + hashlib.sha256(good).hexdigest()


def _rewriting_responses(path: str, rewrite):
    """A proxy that holds the whole response to `path` and sends `rewrite(body)` instead:
    (the new body, headers to add); Content-Length follows the new body."""

    def wrap(app):
        async def proxy(scope, receive, send):
            if scope["type"] != "http" or scope["path"] != path:
                await app(scope, receive, send)
                return
            start: dict = {}
            body = bytearray()

            async def capture(message):
                if message["type"] == "http.response.start":
                    start.update(message)
                    return
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    out, extra = rewrite(bytes(body))
                    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                    headers += [*extra, (b"content-length", str(len(out)).encode())]
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": out})

            await app(scope, receive, capture)

        return proxy

    return wrap


def _rewrite_answer(field: str, value: object, top: bool = False):
    """A proxy that changes one field of the version in the server's answer to an upload (with
    `top`, of the answer itself; the value None removes it)."""

    def rewrite(body: bytes) -> tuple[bytes, list]:
        doc = json.loads(body)
        target = doc if top else doc["version"]
        if value is None:
            del target[field]
        else:
            target[field] = value
        return json.dumps(doc).encode(), []

    return _rewriting_responses("/v1/artifacts", rewrite)


@pytest.mark.parametrize(("field", "value"), [("version", "9.9.9"), ("name", "other")])
def test_a_push_answered_with_another_record_is_an_error(
    registry: Registry, keys_dir: Path, tmp_path: Path, field: str, value: object
):
    """The client compares the answer with what it sent (the name and version it pushed): a
    record rewritten on the way is an error, not a digest to print."""
    from revreg.errors import IntegrityError
    from revreg.registry.remote import RemoteRegistry

    secret = Tokens(registry).create("ci", ["read:*", "push:*"])[0]
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    with (
        running(registry, wrap=_rewrite_answer(field, value)) as url,
        pytest.raises(IntegrityError, match="but this client sent demo:1.0.0"),
    ):
        RemoteRegistry(url, token=secret).push(art)


@pytest.mark.parametrize("value", ["blake3:" + "00" * 32, "", None])
def test_a_push_answered_for_other_bytes_is_an_error(registry: Registry, keys_dir: Path, tmp_path: Path, value):
    """The answer must carry the BLAKE3 of the body as the server received it, equal to the
    client's own: another value, or none (a server or proxy that does not echo it), is refused."""
    from revreg.errors import IntegrityError
    from revreg.registry.remote import RemoteRegistry

    secret = Tokens(registry).create("ci", ["read:*", "push:*"])[0]
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    with (
        running(registry, wrap=_rewrite_answer("received_blake3", value, top=True)) as url,
        pytest.raises(IntegrityError, match="did not report" if value is None else "received other bytes than"),
    ):
        RemoteRegistry(url, token=secret).push(art)


def test_the_echoed_digest_is_the_blake3_of_the_body(served: dict, tmp_path: Path, keys_dir: Path):
    """What the server echoes is computed from the bytes it received, not copied from anything
    the client said: asked for, it is the body's BLAKE3; not asked for, absent; an unknown echo
    algorithm is refused before the body is stored."""
    import blake3

    art = make_artifact(tmp_path / "e.safetensors", keys_dir, version="4.0.0")
    body = art.read_bytes()
    headers = {"Authorization": f"Bearer {served['tokens']['ci']}", "X-Revreg-Name": "demo"}
    bad = httpx.put(f"{served['url']}/v1/artifacts", content=body, headers={**headers, "X-Revreg-Echo": "md5"})
    assert bad.status_code == 422 and "x-revreg-echo" in bad.text.lower(), bad.text
    _nothing_stored(served["registry"])
    r = httpx.put(f"{served['url']}/v1/artifacts", content=body, headers={**headers, "X-Revreg-Echo": "blake3"})
    assert r.status_code == 200, r.text
    assert r.json()["received_blake3"] == "blake3:" + blake3.blake3(body).hexdigest()
    again = httpx.put(f"{served['url']}/v1/artifacts", content=body, headers=headers)
    assert again.status_code == 200 and "received_blake3" not in again.json()


def test_an_echo_asked_for_twice_is_refused(served: dict, tmp_path: Path, keys_dir: Path):
    """Two X-Revreg-Echo headers (whatever their order) are one request the server cannot
    answer as asked: refused, nothing stored."""
    art = make_artifact(tmp_path / "e.safetensors", keys_dir)
    auth = [("Authorization", f"Bearer {served['tokens']['ci']}"), ("X-Revreg-Name", "demo")]
    for values in (["blake3", "sha256"], ["sha256", "blake3"], ["blake3", "blake3"]):
        headers = httpx.Headers([*auth, *(("X-Revreg-Echo", v) for v in values)])
        r = httpx.put(f"{served['url']}/v1/artifacts", content=art.read_bytes(), headers=headers)
        assert 400 <= r.status_code < 500 and "x-revreg-echo" in r.text.lower(), (values, r.text)
        _nothing_stored(served["registry"])


def test_a_probe_set_damaged_on_the_way_is_not_stored(registry: Registry, toy: dict):
    """Probe sets are unsigned: the client declares their sha256, so the server refuses other
    bytes and stores nothing, and an answer naming another digest is an error."""
    from revreg.errors import IntegrityError
    from revreg.registry.remote import RemoteRegistry

    secret = Tokens(registry).create("ci", ["read:*", "push:*"])[0]
    probes = toy["probes"]

    def flip(app):
        async def proxy(scope, receive, send):
            async def damaged():
                message = await receive()
                if scope.get("path") == "/v1/probes" and message.get("body"):
                    body = bytearray(message["body"])
                    body[len(body) // 2] ^= 1
                    message = {**message, "body": bytes(body)}
                return message

            await app(scope, damaged, send)

        return proxy

    with running(registry, wrap=flip) as url, pytest.raises(Exception, match="digest mismatch"):
        RemoteRegistry(url, token=secret).push_probes(probes)
    assert registry.probe_sets() == []

    def rewrite(body: bytes) -> tuple[bytes, list]:
        doc = json.loads(body)
        doc["probes"]["digest"] = "sha256:" + "00" * 32
        return json.dumps(doc).encode(), []

    with (
        running(registry, wrap=_rewriting_responses("/v1/probes", rewrite)) as url,
        pytest.raises(IntegrityError, match="recorded the probe set as sha256:0000"),
    ):
        RemoteRegistry(url, token=secret).push_probes(probes)


def _resign_uploads(old: bytes, new: bytes):
    """A proxy that swaps the upload's signature envelope for another valid one (same length)."""

    def wrap(app):
        async def proxy(scope, receive, send):
            if scope["type"] != "http" or scope["path"] != "/v1/artifacts":
                await app(scope, receive, send)
                return
            body = bytearray()
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            swapped = [bytes(body).replace(old, new)]

            async def replay():
                if swapped:
                    return {"type": "http.request", "body": swapped.pop(), "more_body": False}
                return await receive()

            await app(scope, replay, send)

        return proxy

    return wrap


@pytest.mark.parametrize("scopes", [["read:*", "push:*"], ["push:*"]])
def test_a_push_whose_bytes_are_re_signed_on_the_way_is_an_error(
    registry: Registry, keys_dir: Path, tmp_path: Path, scopes: list[str]
):
    """Another trusted publisher's signature over the same manifest is a valid artifact of the
    same size: the server stores it, and only the client's own digest of what it sent (BLAKE3,
    compared with the server's of what it received) tells the user that the registry holds other
    bytes than theirs."""
    from revreg.artifacts.artifact import PAYLOAD_TYPE, open_artifact
    from revreg.artifacts.dsse import sign
    from revreg.errors import IntegrityError
    from revreg.registry.remote import RemoteRegistry

    ring = Keyring(keys_dir)
    ring.generate("bob")
    registry.trust_key(ring.public_pem("bob"), "bob", "publisher")
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    envelope = open_artifact(art).envelope
    resigned = sign(envelope.payload, PAYLOAD_TYPE, ring.signer("bob")).to_json()
    old, new = (json.dumps(e.decode())[1:-1].encode() for e in (envelope.to_json(), resigned))
    assert len(old) == len(new) and art.read_bytes().count(old) == 1
    secret = Tokens(registry).create("ci", scopes)[0]
    with (
        running(registry, wrap=_resign_uploads(old, new)) as url,
        pytest.raises(IntegrityError, match="received other bytes than this client sent"),
    ):
        RemoteRegistry(url, token=secret).push(art)


def test_registry_commands_do_not_import_httpx_command_line_client(tmp_path: Path):
    """httpx loads its own CLI (rich, pygments) on import; the registry client skips it, and
    httpx.main still works."""
    import subprocess
    import sys

    code = (
        "import sys, revreg.registry.remote, httpx\n"
        "assert 'httpx._main' not in sys.modules and 'pygments' not in sys.modules, sorted(sys.modules)\n"
        "assert 'rich' not in sys.modules\n"
        "import httpx._main as real\n"
        "assert sys.modules['httpx._main'] is real and real.main is not httpx.main\n"
        "sys.argv = ['httpx', '--help']\n"
        "httpx.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage: httpx" in out.stdout


def test_remote_push_of_a_stored_version_sends_no_body(served, keys_dir: Path, tmp_path: Path):
    from revreg.registry.remote import RemoteRegistry

    remote = RemoteRegistry(served["url"], token=served["tokens"]["ci"])
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    assert remote.push(art).created
    sent: list[str] = []
    remote._http.event_hooks["request"].append(lambda request: sent.append(f"{request.method} {request.url.path}"))
    again = remote.push(art)
    assert not again.created and sent == ["POST /v1/uploads/check"]
    other = make_artifact(tmp_path / "b.safetensors", keys_dir, seed=1)  # same name:version, other bytes
    sent.clear()
    with pytest.raises(ConflictError, match="already exists with digest"):
        remote.push(other)
    assert sent == ["POST /v1/uploads/check"]
    (tmp_path / "t.safetensors").write_bytes(_tampered(art))
    sent.clear()
    with pytest.raises(RevregError, match="do not match the signed manifest"):
        remote.push(tmp_path / "t.safetensors")
    assert sent == ["POST /v1/uploads/check"]


def test_upload_check_asks_about_exactly_one_thing(served):
    headers = {"Authorization": f"Bearer {served['tokens']['ci']}"}
    for body in ({"name": "demo"}, {"name": "demo", "version": "1.0.0", "digest": "sha256:" + "0" * 64}):
        response = httpx.post(f"{served['url']}/v1/uploads/check", json=body, headers=headers)
        assert response.status_code == 400 and "exactly one" in response.json()["error"]["message"]
    response = httpx.post(
        f"{served['url']}/v1/uploads/check", json={"name": "demo", "version": "../x"}, headers=headers
    )
    assert response.status_code == 400


def test_a_key_revoked_while_its_upload_streams_stores_nothing(served, keys_dir: Path, tmp_path: Path):
    """The signature is checked on the header, before the data; a revocation that lands while
    the body is still arriving must still refuse the push (checked again when it is recorded)."""
    data = make_artifact(
        tmp_path / "a.safetensors", keys_dir, size=1 << 20
    ).read_bytes()  # 4 MiB, under the 8 MiB limit
    parts = urlsplit(served["url"])
    with socket.create_connection((parts.hostname, parts.port)) as s:
        s.sendall(
            (
                f"PUT /v1/artifacts HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {served['tokens']['ci']}"
                f"\r\nX-Revreg-Name: demo\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            ).encode()
            + data[: len(data) // 2]
        )
        time.sleep(0.5)  # the header has arrived and been accepted
        served["registry"].revoke_key("alice", "compromised")
        s.sendall(data[len(data) // 2 :])
        s.settimeout(30)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 4") and b"revoked key alice" in answer
    _nothing_stored(served["registry"])


def test_upload_check_by_version_tells_a_push_only_token_no_record(served, keys_dir: Path, tmp_path: Path, run):
    from revreg.registry.remote import RemoteRegistry

    art = make_artifact(tmp_path / "a.safetensors", keys_dir, name="team-a.tone")
    assert RemoteRegistry(served["url"], token=served["tokens"]["ci"]).push(art).created
    pusher = Tokens(served["registry"]).create("pusher", ["push:team-a"])[0]
    answer = httpx.post(
        f"{served['url']}/v1/uploads/check",
        json={"name": "team-a.tone", "version": "1.0.0"},
        headers={"Authorization": f"Bearer {pusher}"},
    ).json()
    assert answer == {"stored": False, "version": None, "exists": True}
    # By digest it learns nothing either (knowing a digest is not holding the bytes) ...
    by_digest = httpx.post(
        f"{served['url']}/v1/uploads/check",
        json={"name": "team-a.tone", "digest": "sha256:" + __import__("hashlib").sha256(art.read_bytes()).hexdigest()},
        headers={"Authorization": f"Bearer {pusher}"},
    ).json()
    assert by_digest == {"stored": False, "version": None}
    # ... so it sends the bytes, and the upload's answer is the version those bytes are.
    again = RemoteRegistry(served["url"], token=pusher).push(art)
    assert not again.created and again.version.ref == "team-a.tone:1.0.0"


def test_tagging_needs_read_as_well_as_push(served, keys_dir: Path, tmp_path: Path):
    from revreg.registry.remote import RemoteRegistry

    art = make_artifact(tmp_path / "a.safetensors", keys_dir, name="team-a.tone")
    RemoteRegistry(served["url"], token=served["tokens"]["ci"]).push(art)
    pusher = Tokens(served["registry"]).create("pusher2", ["push:team-a"])[0]
    answer = httpx.post(
        f"{served['url']}/v1/tags",
        json={"ref": "team-a.tone:1.0.0", "tag": "probe"},
        headers={"Authorization": f"Bearer {pusher}"},
    )
    assert answer.status_code == 403 and "digest" not in answer.text
    ok = httpx.post(
        f"{served['url']}/v1/tags",
        json={"ref": "team-a.tone:1.0.0", "tag": "stable"},
        headers={"Authorization": f"Bearer {served['tokens']['team-a']}"},
    )
    assert ok.status_code == 200 and ok.json()["tags"] == ["stable"]


def test_publish_and_yank_need_read_as_well(served, keys_dir: Path, tmp_path: Path):
    from revreg.registry.remote import RemoteRegistry

    art = make_artifact(tmp_path / "a.safetensors", keys_dir, name="team-a.tone")
    RemoteRegistry(served["url"], token=served["tokens"]["ci"]).push(art)
    publisher = Tokens(served["registry"]).create("pub-only", ["publish:team-a"])[0]
    for path, body in (
        ("/v1/yank", {"ref": "team-a.tone:1.0.0", "reason": "x"}),
        ("/v1/publish", {"ref": "team-a.tone:1.0.0"}),
    ):
        answer = httpx.post(f"{served['url']}{path}", json=body, headers={"Authorization": f"Bearer {publisher}"})
        assert answer.status_code == 403 and "sha256" not in answer.text and "pending" not in answer.text
    assert served["registry"].resolve("team-a.tone:1.0.0").state == "pending"


def test_the_client_reads_responses_a_mebibyte_at_a_time():
    """The pull's read size is httpcore's class attribute (docs/performance.md): if a new httpcore
    renames it, this fails and the figure must be measured again."""
    from httpcore._sync.http11 import HTTP11Connection

    from revreg.registry.remote import HTTP_READ_SIZE, RemoteRegistry

    RemoteRegistry("http://127.0.0.1:9")
    assert HTTP11Connection.READ_NUM_BYTES >= HTTP_READ_SIZE == 1 << 20


def _gzip_every_artifact(app):
    """A proxy that compresses the artifact download whatever the client asked for."""
    import gzip

    return _rewriting_responses("/v1/artifact", lambda body: (gzip.compress(body), [(b"content-encoding", b"gzip")]))(
        app
    )


def test_a_download_in_a_content_encoding_is_refused_and_nothing_written(
    run, registry: Registry, keys_dir: Path, tmp_path: Path
):
    """The client reads the body raw; a proxy that compresses it anyway (the client asked for
    identity) is refused in one line, and nothing reaches the output."""
    art = make_artifact(tmp_path / "a.safetensors", keys_dir)
    registry.push(art)
    secret = Tokens(registry).create("reader", ["read:*"])[0]
    out = tmp_path / "out"
    out.mkdir()

    def pull(url: str):
        pull_args = ("pull", "demo:1.0.0", "--allow-unpublished", "-o", out / "a.safetensors", "--registry", url)
        return run(*pull_args, env={"REVREG_TOKEN": secret})

    with running(registry, wrap=_gzip_every_artifact) as url:
        result = pull(url)
    assert result.exit_code == 1, result.output
    assert "content-encoding 'gzip'" in result.output and result.output.count("\n") == 1
    assert list(out.iterdir()) == []
    with running(registry) as url:  # without the proxy the same pull works, byte for byte
        result = pull(url)
    assert result.exit_code == 0, result.output
    assert (out / "a.safetensors").read_bytes() == art.read_bytes()


class _ChangeTheFile:
    """A progress display that, at the upload's first block, makes the file grow or shrink: what
    a writer still busy with the file does to a push."""

    def __init__(self, path: Path, grow: bool) -> None:
        self.path, self.grow, self.done = path, grow, False

    def start(self, label: str, total: int | None) -> object:
        return label

    def advance(self, handle: object, n: int, label: str | None = None) -> None:
        if not self.done and str(handle).startswith("upload"):
            self.done = True
            size = self.path.stat().st_size
            with open(self.path, "r+b") as fh:
                if self.grow:
                    fh.seek(0, 2)
                    fh.write(b"\0" * 4096)
                else:
                    fh.truncate(size - 4096)

    def finish(self, handle: object) -> None:
        pass


@pytest.mark.parametrize("grow", [True, False])
def test_an_upload_of_a_file_that_changes_size_is_refused_and_stores_nothing(
    served, keys_dir: Path, tmp_path: Path, grow: bool
):
    from revreg import progress
    from revreg.errors import InputError
    from revreg.registry.remote import RemoteRegistry

    art = make_artifact(tmp_path / "a.safetensors", keys_dir, size=1 << 20)  # 4 MiB: many blocks
    remote = RemoteRegistry(served["url"], token=served["tokens"]["ci"])
    with (
        progress.showing(_ChangeTheFile(art, grow)),
        pytest.raises(InputError, match="changed while it was being pushed"),
    ):
        remote.push(art)
    assert served["registry"].ls() == []
    staging = served["registry"].store.staging_dir
    deadline = time.monotonic() + 30  # the server removes its staging file once it sees the cut
    while staging.is_dir() and list(staging.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not staging.is_dir() or list(staging.iterdir()) == []


def _mangling_proxy(mode: str, ranges: list):
    """A proxy in front of the artifact download: `drop` cuts the first response at 1.5 MB (the
    client resumes with a Range request), `wrong206` then answers the resume with the whole file
    labelled 206, `flip` flips one bit at 2 MB."""

    def wrap(app):
        async def proxy(scope, receive, send):
            if scope["type"] != "http" or scope["path"] != "/v1/artifact":
                await app(scope, receive, send)
                return
            ranges.append({k.lower(): v for k, v in scope["headers"]}.get(b"range"))
            first, sent = len(ranges) == 1, 0
            if mode == "wrong206" and not first:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}

                async def as206(message):
                    await send({**message, "status": 206} if message["type"] == "http.response.start" else message)

                await app(scope, receive, as206)
                return

            async def out(message):
                nonlocal sent
                body = message.get("body", b"")
                if message["type"] == "http.response.body":
                    if mode in ("drop", "wrong206") and first and sent + len(body) >= 1_500_000:
                        await send({**message, "body": body[: 1_500_000 - sent], "more_body": True})
                        raise RuntimeError("connection dropped")
                    if mode == "flip" and sent <= 2_000_000 < sent + len(body):
                        flipped = bytearray(body)
                        flipped[2_000_000 - sent] ^= 1
                        message = {**message, "body": bytes(flipped)}
                    sent += len(body)
                await send(message)

            await app(scope, receive, out)

        return proxy

    return wrap


@pytest.mark.parametrize("mode", ["drop", "wrong206", "flip"])
def test_a_cut_or_mangled_download_resumes_exactly_or_writes_nothing(
    run, registry: Registry, keys_dir: Path, tmp_path: Path, mode: str
):
    """Red team: the raw 1 MiB reads still resume a cut download byte-exact, and a resume that
    restarts from byte 0 or a flipped bit is refused with nothing at the output."""
    art = make_artifact(tmp_path / "a.safetensors", keys_dir, size=1 << 20)  # 4 MiB
    registry.push(art)
    secret = Tokens(registry).create("reader", ["read:*"])[0]
    out = tmp_path / "out"
    out.mkdir()
    ranges: list = []
    with running(registry, wrap=_mangling_proxy(mode, ranges)) as url:
        result = run(
            "pull",
            "demo:1.0.0",
            "--allow-unpublished",
            "-o",
            out / "a.safetensors",
            "--registry",
            url,
            env={"REVREG_TOKEN": secret},
        )
    if mode == "drop":
        assert result.exit_code == 0, result.output
        assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith(b"bytes=")
        assert (out / "a.safetensors").read_bytes() == art.read_bytes()
    else:
        assert result.exit_code == 1, result.output
        assert list(out.iterdir()) == []


def test_the_server_process_keeps_freed_body_chunks_for_reuse():
    """`revreg serve` tunes glibc so that each upload chunk's bytes reuse freed pages
    (revreg/allocator.py; measured by `bench_pipeline.py --only allocator`): on glibc the setting
    must take, twice over; without ctypes it is skipped, not a crash. In child processes: it
    changes the allocator of the whole process."""
    import platform
    import subprocess
    import sys

    call = "from revreg.allocator import keep_freed_memory as k; print(k(), k())"
    took = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, check=True).stdout.split()
    assert took == (["True", "True"] if platform.libc_ver()[0] == "glibc" else ["False", "False"])
    no_ctypes = "import sys; sys.modules['_ctypes'] = None; " + call
    result = subprocess.run([sys.executable, "-c", no_ctypes], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stderr


def test_an_upload_answer_without_its_record_is_an_error(registry: Registry, keys_dir: Path, tmp_path: Path):
    """The echo matches but the record is gone (or not an object): an IntegrityError in one line,
    not a KeyError from deep in the client."""
    from revreg.errors import IntegrityError
    from revreg.registry.remote import RemoteRegistry

    secret = Tokens(registry).create("ci", ["read:*", "push:*"])[0]
    for n, value in enumerate([None, "not a record"]):
        art = make_artifact(tmp_path / f"a{n}.safetensors", keys_dir, version=f"1.0.{n}")
        with (
            running(registry, wrap=_rewrite_answer("version", value, top=True)) as url,
            pytest.raises(IntegrityError, match="answered the upload without its version record"),
        ):
            RemoteRegistry(url, token=secret).push(art)
