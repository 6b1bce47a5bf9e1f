"""RemoteRegistry: the registry interface over HTTP (`revreg serve`), so every verb works with
`--registry http(s)://…`. Checks that protect the user (digest, signature, tensors) run on this
side of the wire too. Imports no SQLAlchemy: entities, errors and JSON shapes come from `api`."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from revreg import errors, progress
from revreg.artifacts.keys import TrustedKey, keyid_of, load_public_pem
from revreg.registry.api import (
    ERRORS_BY_NAME,
    AuditEntryInfo,
    BaseInfo,
    ChainVerdict,
    FsckReport,
    KeyRecord,
    ProbeSetInfo,
    PushResult,
    Request,
    StateError,
    Unsupported,
    VersionDetail,
    VersionInfo,
    from_json,
    same_bytes,
)
from revreg.registry.delivery import check_format, deliver
from revreg.registry.httpx_client import httpx
from revreg.registry.store import Pipeline, Tap

BLOCK = 1 << 20
RESUME_ATTEMPTS = 5
T = TypeVar("T")
# The digest both ends of an upload compute of its body, to compare (see RemoteRegistry._upload).
ECHO = "blake3"
# Key ids (sha256:… of the public key, as `revreg keys list` prints them) this client trusts,
# comma-separated; when set, the server's word on who is trusted is not taken.
PIN_ENV = {"publisher": "REVREG_PIN_PUBLISHERS", "verifier": "REVREG_PIN_VERIFIERS"}


def pins_from_env() -> dict[str, frozenset[str]]:
    pins = {}
    for role, var in PIN_ENV.items():
        raw = os.environ.get(var, "")
        ids = frozenset(p.strip() for p in raw.split(",") if p.strip())
        if ids:
            pins[role] = ids
    return pins


def _check_url(url: str) -> str:
    if not url.isprintable() or " " in url:  # httpx would raise its own InvalidURL deep in a request
        raise errors.InputError(f"{url!r} is not a usable registry URL (spaces or control characters)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise errors.InputError(f"{url!r} is not a usable registry URL ({exc})") from exc
    if parts.scheme == "http":
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise errors.InputError(f"{url}: plain http:// is allowed on loopback only; use https://")
    return url.rstrip("/")


def _saved_token(url: str) -> str | None:
    from revreg.config import saved_token

    return saved_token(url)


def _list(cls: type[T], docs: Any) -> list[T]:
    if not isinstance(docs, list):
        raise errors.RevregError(f"the server sent {type(docs).__name__} where a list of {cls.__name__} belongs")
    return [from_json(cls, d) for d in docs]


# httpcore reads a response 64 KiB at a time (HTTP11Connection.READ_NUM_BYTES, a class attribute
# with no public setting); with 1 MiB reads a 1 GiB pull over loopback took 3.7-4.1 s here instead
# of 4.9-5.1 s (`python benchmarks/bench_server.py --only transfer`): fewer trips through h11, and
# the kernel copies into a fresh 64 KiB buffer several times slower than into a 1 MiB one. Only the
# size of each read changes; tests/test_server.py notices if httpcore drops the attribute.
HTTP_READ_SIZE = 1 << 20


def _larger_reads() -> None:
    from httpcore._sync import http11

    if getattr(http11.HTTP11Connection, "READ_NUM_BYTES", HTTP_READ_SIZE) < HTTP_READ_SIZE:
        http11.HTTP11Connection.READ_NUM_BYTES = HTTP_READ_SIZE


class RemoteRegistry:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 600.0,
        pins: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.url = _check_url(url)
        self.pins = pins_from_env() if pins is None else pins
        secret = (token or os.environ.get("REVREG_TOKEN") or _saved_token(self.url) or "").strip()
        if secret and not (secret.isascii() and secret.isprintable() and " " not in secret):
            # Never echo it: a token is a secret even when it is malformed.
            raise errors.InputError(
                "the API token ($REVREG_TOKEN or the one `revreg login` stored) has spaces, control or "
                "non-ASCII characters"
            )
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        _larger_reads()
        # Plain http never negotiates TLS (redirects are not followed): no CA bundle to load (57 ms).
        verify = not self.url.startswith("http://")
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), verify=verify
        )

    def describe(self) -> str:
        return self.url

    # -- transport ---------------------------------------------------------------------------
    def _raise(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            doc = response.json()
            error = doc.get("error") or {}
            kind, message = error.get("type", ""), error.get("message", "")
            if not message and "detail" in doc:
                kind, message = "InputError", f"request refused: {doc['detail']}"
        except (ValueError, AttributeError):
            kind, message = "", response.text[:200]
        default: type[errors.RevregError] = errors.Unreachable if response.status_code >= 500 else errors.RevregError
        cls = ERRORS_BY_NAME.get(kind, default)
        raise cls(f"{message} (HTTP {response.status_code} from {self.url})")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.Unreachable(f"cannot reach the registry at {self.url}: {exc}") from exc
        self._raise(response)
        try:
            return response.json()
        except ValueError as exc:
            raise errors.Unreachable(f"{self.url} answered, but not as a revreg registry (not JSON)") from exc

    def _answered(self, doc: Any, field: str) -> dict[str, Any]:
        """The record an upload's answer must carry, or an error that says it is missing."""
        record = doc.get(field) if isinstance(doc, dict) else None
        if not isinstance(record, dict):
            raise errors.IntegrityError(f"the registry at {self.url} answered the upload without its {field} record")
        return record

    def _upload(self, path: str, file: Path, extra: dict[str, str] | None = None) -> Any:
        """PUT a file, read once, and check that the server received exactly the bytes sent: both
        ends compute the body's BLAKE3 (here on a second thread while this one sends; the server
        beside its own checks, asked by `X-Revreg-Echo`) and the server's answer must carry the
        same. BLAKE3, not a second sha256: on two cores a sha256 pass on the client was the
        largest cost of an upload (docs/performance.md). The server's answer, checked."""
        file = Path(file)
        try:
            fh = open(file, "rb")  # noqa: SIM115 - closed below
            size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise errors.InputError(f"cannot read {file}: {exc.strerror}") from exc
        # The hash on its own thread while this one sends, in BLOCK (1 MiB) pieces: a quarter of
        # the trips through httpx and h11 that the pipeline's 256 KiB blocks would make.
        hashing = Pipeline(None, block=BLOCK, algorithms=(ECHO,))

        def body() -> Iterator[memoryview]:
            # Each block is read once into one of the pipeline's page-aligned buffers, hashed
            # there and sent from there: the buffer goes back to the pipeline only when hashed,
            # and the HTTP library has copied it out before it asks for the next block.
            sent = 0
            while sent < size:
                buf = hashing.buffer()
                n = fh.readinto(memoryview(buf)[: min(len(buf), size - sent)])
                sent += n
                if not n or (sent == size and fh.read(1)):
                    hashing.submit(buf, 0)
                    break  # it shrank, or grew: refused before the last block lets the server finish
                hashing.submit(buf, n)
                yield memoryview(buf)[:n]
            else:
                return
            # Content-Length was promised: a file that changed size cannot be sent as it is, and
            # the server, short of bytes, stores nothing.
            raise errors.InputError(f"{file} changed while it was being pushed; push it again")

        headers = {
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
            "X-Revreg-Echo": ECHO,
            **(extra or {}),
        }
        try:
            with fh, progress.task(f"upload {file.name}", size):
                doc = self._call("PUT", path, content=body(), headers=headers)
            sent = hashing.close()[0]
        finally:
            hashing.abort()
        received = doc.get(f"received_{ECHO}") if isinstance(doc, dict) else None
        if received is None:
            raise errors.IntegrityError(
                f"the registry at {self.url} did not report the {ECHO} of what it received, so this client "
                f"cannot tell that it stored the bytes sent: the server may be older than this client "
                f"(upgrade it), or something on the way dropped the answer's received_{ECHO}"
            )
        if received != sent:
            raise errors.IntegrityError(
                f"the registry at {self.url} received other bytes than this client sent ({ECHO} {received}, "
                f"sent {sent}); it may have stored them as a valid artifact: check the server and the network"
            )
        return doc

    def _download(self, path: str, params: dict[str, Any], sink: BinaryIO, tap: Tap | None = None) -> str:
        """Stream a download into `sink` in one pass (written, hashed and handed to `tap` from the
        same buffers: registry.store.Pipeline), resuming with Range requests if the connection
        drops; the bytes' sha256."""
        pipe = Pipeline(sink, durable=True, tap=tap)
        try:
            for attempt in range(RESUME_ATTEMPTS):
                # The bytes as sent (identity encoding, read raw): no decoder or re-chunking
                # copies them before the pipeline gathers them into its blocks.
                headers = {"Accept-Encoding": "identity"}
                if pipe.received:
                    headers["Range"] = f"bytes={pipe.received}-"
                try:
                    with self._http.stream("GET", path, params=params, headers=headers) as response:
                        if response.status_code >= 400:
                            response.read()
                            self._raise(response)
                        if pipe.received and response.status_code != 206:
                            raise errors.IntegrityError("the server ignored the resume request; pull again")
                        encoding = response.headers.get("content-encoding", "identity").strip().lower()
                        if encoding != "identity":
                            raise errors.IntegrityError(
                                f"{self.url} sent the artifact with content-encoding {encoding!r} "
                                "after this client asked for identity; nothing was written"
                            )
                        for chunk in response.iter_raw():
                            pipe.write(chunk)
                    return pipe.close()[0]
                except (httpx.TransportError, httpx.StreamError) as exc:
                    if attempt == RESUME_ATTEMPTS - 1:
                        raise errors.Unreachable(
                            f"download from {self.url} failed after {pipe.received} bytes: {exc}"
                        ) from exc
            raise AssertionError("unreachable")
        finally:
            pipe.abort()

    # -- keys --------------------------------------------------------------------------------
    def trust_key(self, pem: bytes, name: str, role: str) -> KeyRecord:
        return from_json(
            KeyRecord, self._call("POST", "/v1/keys/trust", json={"pem": pem.decode(), "name": name, "role": role})
        )

    def revoke_key(self, key_ref: str, reason: str) -> list[KeyRecord]:
        return _list(KeyRecord, self._call("POST", "/v1/keys/revoke", json={"key": key_ref, "reason": reason}))

    def key_records(self) -> list[KeyRecord]:
        return _list(KeyRecord, self._call("GET", "/v1/keys"))

    def trusted(self, role: str, include_revoked: bool = False) -> dict[str, TrustedKey]:
        """The server's trust anchors for a role, each re-derived from its public key (a key id
        that is not the key's own digest is refused); with pins for the role, only the pinned ones:
        the server cannot add a key this client does not already trust."""
        rows = self._call("GET", "/v1/keys/pem", params={"role": role, "include_revoked": include_revoked})
        keys = {}
        for r in rows:
            public = load_public_pem(str(r["pem"]).encode(), str(r["name"]))
            if keyid_of(public) != r["keyid"]:
                raise errors.IntegrityError(
                    f"{self.url} serves key {r['name']} as {r['keyid']}, but that public key is {keyid_of(public)}"
                )
            keys[r["keyid"]] = TrustedKey(r["name"], r["keyid"], public)
        pinned = self.pins.get(role)
        if pinned is None:
            return keys
        return {keyid: key for keyid, key in keys.items() if keyid in pinned}

    # -- bases -------------------------------------------------------------------------------
    def register_base(self, path: Path, name: str | None = None) -> tuple[BaseInfo, bool]:
        from revreg.artifacts.sources import identity_of_path

        doc = self._call("POST", "/v1/bases", json={"manifest": identity_of_path(path).to_dict(), "name": name})
        return from_json(BaseInfo, doc["base"]), bool(doc["created"])

    def bases(self) -> list[BaseInfo]:
        return _list(BaseInfo, self._call("GET", "/v1/bases"))

    # -- versions ----------------------------------------------------------------------------
    def push(self, path: Path) -> PushResult:
        """Ask first, by the name and version in the file's header (is this name ours to push,
        is this version stored already?). A stored version costs one local hash pass and no
        upload: the same bytes are "already present", other bytes a conflict. Otherwise the file
        is sent once, hashed while it is sent, and the server checks it as it arrives."""
        from revreg.artifacts.artifact import open_artifact
        from revreg.artifacts.stream import ArtifactStream
        from revreg.registry.store import copy_hashing

        path = Path(path)
        artifact = open_artifact(path)
        m = artifact.manifest
        check = self._call("POST", "/v1/uploads/check", json={"name": m.name, "version": m.version})
        if check.get("version") is not None:  # stored, and this token may read its record
            info = from_json(VersionInfo, check["version"])
            try:
                with open(path, "rb") as fh:
                    # One pass: the file's digest, and its tensors (damage is named as such).
                    stream = ArtifactStream(str(path), os.fstat(fh.fileno()).st_size)
                    digest, _ = copy_hashing(fh, None, tap=stream)
                    stream.finish()
            except OSError as exc:
                raise errors.InputError(f"cannot read {path}: {exc.strerror}") from exc
            same_bytes(info, digest)
            if check.get("stored"):
                return PushResult(info, False)
        # A new version, or a token that may not read this name (it learns only whether the
        # version exists): the upload itself proves the bytes, and its answer names the version.
        # The answer must be for the bytes sent (their BLAKE3, see _upload): the server's checks
        # refuse any damaged byte, but not another valid signature over the same manifest (a
        # second publisher's, or a second one by the same key: Ed25519 verifies many per message).
        doc = self._upload("/v1/artifacts", path, {"X-Revreg-Name": m.name})
        result = PushResult(from_json(VersionInfo, self._answered(doc, "version")), bool(doc.get("created")))
        if result.version.ref != f"{m.name}:{m.version}":
            raise errors.IntegrityError(
                f"the registry at {self.url} recorded {result.version.ref} as {result.version.digest}, "
                f"but this client sent {m.name}:{m.version}: check the server and the network"
            )
        return result

    def pull(
        self,
        ref: str,
        dest: Path,
        fmt: str = "safetensors",
        allow_unpublished: bool = False,
        allow_yanked: bool = False,
    ) -> VersionInfo:
        check_format(fmt)
        info = self.resolve(ref)
        self._check_answer(ref, info, allow_unpublished, allow_yanked)
        publishers = self.trusted("publisher")
        params = {"ref": info.pinned, "allow_unpublished": allow_unpublished, "allow_yanked": allow_yanked}
        if info.state == "published" or ("verifier" in self.pins and not allow_unpublished):
            self._check_certified(info)

        def fill(sink: BinaryIO, tap: Tap) -> str:
            with progress.task(f"download {info.ref}", info.size):
                return self._download("/v1/artifact", params, sink, tap)

        deliver(info, publishers, Path(dest), fmt, fill, "download")
        return info

    def _check_answer(self, ref: str, info: VersionInfo, allow_unpublished: bool, allow_yanked: bool) -> None:
        """What the server resolved must be what was asked for, in a state this pull accepts:
        checked here, so a server cannot hand out another version or an unpublished one."""
        from revreg.registry.refs import parse_ref

        wanted = parse_ref(ref)
        if (
            info.name != wanted.name
            or (wanted.digest is not None and info.digest != wanted.digest)
            or (wanted.selector is not None and wanted.selector not in (info.version, *info.tags))
        ):
            raise errors.IntegrityError(f"asked {self.url} for {ref}, it answered with {info.ref} ({info.digest})")
        if info.state == "yanked" and not allow_yanked:
            raise StateError(f"{info.ref} was yanked ({info.yank_reason}); pass --allow-yanked to pull it anyway")
        if info.state not in ("published", "yanked") and not allow_unpublished:
            raise StateError(f"{info.ref} is {info.state}, not published (pass --allow-unpublished to pull it anyway)")

    def _check_certified(self, info: VersionInfo) -> None:
        """The publish gate again, on this side: the newest certification by a verifier this client
        trusts (pinned, or the server's) must say PASS about exactly these bytes."""
        from revreg.registry.policy import RequirePassingCertification

        certifications = self.show(info.pinned).certifications
        try:
            RequirePassingCertification().verify(
                info.ref, info.digest, [c.envelope for c in certifications], self.trusted("verifier")
            )
        except errors.RevregError as exc:
            where = " pinned in REVREG_PIN_VERIFIERS" if "verifier" in self.pins else ""
            raise type(exc)(f"{exc} (checked by this client against the verifier keys{where})") from exc

    def resolve(self, ref: str) -> VersionInfo:
        return from_json(VersionInfo, self._call("GET", "/v1/resolve", params={"ref": str(ref)}))

    def ls(self, name: str | None = None) -> list[VersionInfo]:
        return _list(VersionInfo, self._call("GET", "/v1/versions", params={"name": name} if name else {}))

    def show(self, ref: str) -> VersionDetail:
        return from_json(VersionDetail, self._call("GET", "/v1/show", params={"ref": str(ref)}))

    def tag(self, ref: str, tag: str, allow_downgrade: bool = False) -> VersionInfo:
        body = {"ref": str(ref), "tag": tag, "allow_downgrade": allow_downgrade}
        return from_json(VersionInfo, self._call("POST", "/v1/tags", json=body))

    def publish(self, ref: str) -> VersionInfo:
        return from_json(VersionInfo, self._call("POST", "/v1/publish", json={"ref": str(ref)}))

    def yank(self, ref: str, reason: str) -> VersionInfo:
        return from_json(VersionInfo, self._call("POST", "/v1/yank", json={"ref": str(ref), "reason": reason}))

    def record_certification(self, ref: str, envelope: bytes | str) -> VersionInfo:
        text = envelope.decode("utf-8") if isinstance(envelope, bytes) else envelope
        doc = self._call("POST", "/v1/certifications", json={"ref": str(ref), "envelope": text})
        return from_json(VersionInfo, doc)

    # -- probe sets --------------------------------------------------------------------------
    def push_probes(self, path: Path) -> tuple[ProbeSetInfo, bool]:
        """A probe set is unsigned and small: its sha256 is computed first and declared
        (`X-Revreg-Digest`), so the server stores nothing but those bytes, and the answer must
        name that digest as well as echo the body's BLAKE3."""
        from revreg.registry.store import digest_of

        try:
            with open(path, "rb") as fh:
                digest, _ = digest_of(fh)
        except OSError as exc:
            raise errors.InputError(f"cannot read {path}: {exc.strerror}") from exc
        doc = self._upload("/v1/probes", Path(path), {"X-Revreg-Digest": digest})
        info = from_json(ProbeSetInfo, self._answered(doc, "probes"))
        if info.digest != digest:
            raise errors.IntegrityError(
                f"the registry at {self.url} recorded the probe set as {info.digest}, "
                f"but this client sent {digest}: check the server and the network"
            )
        return info, bool(doc.get("created"))

    def probe_sets(self) -> list[ProbeSetInfo]:
        return _list(ProbeSetInfo, self._call("GET", "/v1/probes"))

    def probe_digest(self, ref: str) -> str:
        return str(self._call("GET", "/v1/probes/digest", params={"ref": ref})["digest"])

    def fetch_probes(self, ref: str, directory: Path) -> Path:
        """Download a probe set by its digest and check the bytes against it."""
        digest = self.probe_digest(ref)
        out = Path(directory) / f"{digest.split(':')[1][:16]}.probes.safetensors"
        with open(out, "wb") as sink:
            actual = self._download("/v1/probes/file", {"ref": digest}, sink)
        if actual != digest:
            out.unlink()
            raise errors.IntegrityError(f"probe set {ref} from {self.url} is corrupt: expected {digest}, read {actual}")
        return out

    # -- certification queue -----------------------------------------------------------------
    def request_certification(
        self,
        ref: str,
        base: str,
        probes: str,
        factory: str | None = None,
        device: str = "cpu",
        cycles: int = 3,
        baselines: tuple[str, ...] = (),
    ) -> Request:
        body = {
            "ref": ref,
            "base": base,
            "probes": probes,
            "factory": factory,
            "device": device,
            "cycles": cycles,
            "baselines": list(baselines),
        }
        return from_json(Request, self._call("POST", "/v1/queue", json=body))

    def requests(self, state: str | None = None) -> list[Request]:
        return _list(Request, self._call("GET", "/v1/queue", params={"state": state} if state else {}))

    def claim_request(self, worker: str, lease: float) -> Request | None:
        doc = self._call("POST", "/v1/queue/claim", json={"worker": worker, "lease": lease})
        return None if doc is None else from_json(Request, doc)

    def renew_lease(self, request_id: int, worker: str, lease: float) -> bool:
        doc = self._call("POST", f"/v1/queue/{int(request_id)}/renew", json={"worker": worker, "lease": lease})
        return bool(doc["held"])

    def complete_request(self, request_id: int, worker: str, envelope: bytes | str) -> VersionInfo | None:
        text = envelope.decode("utf-8") if isinstance(envelope, bytes) else envelope
        doc = self._call("POST", f"/v1/queue/{int(request_id)}/complete", json={"worker": worker, "envelope": text})
        return None if doc is None else from_json(VersionInfo, doc)

    def fail_request(self, request_id: int, worker: str, message: str) -> None:
        self._call("POST", f"/v1/queue/{int(request_id)}/fail", json={"worker": worker, "message": message[:4000]})

    # -- integrity ---------------------------------------------------------------------------
    def audit_log(self, subject: str | None = None) -> list[AuditEntryInfo]:
        params = {"subject": subject} if subject else {}
        return _list(AuditEntryInfo, self._call("GET", "/v1/audit/log", params=params))

    def audit_verify(self) -> ChainVerdict:
        return from_json(ChainVerdict, self._call("GET", "/v1/audit/verify"))

    def fsck(self, prune: bool = False, grace: float = 3600.0) -> FsckReport:
        if prune:
            raise Unsupported("fsck --prune runs on the server's machine, not over HTTP")
        return from_json(FsckReport, self._call("GET", "/v1/fsck"))


__all__ = ["RemoteRegistry"]
