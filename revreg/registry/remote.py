"""RemoteRegistry: the Registry service's interface over HTTP, so every CLI verb works against
`revreg serve`. Checks that protect the user (digest, signature, tensors) run here too."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx

from revreg import errors
from revreg.artifacts.keys import TrustedKey, load_public_pem
from revreg.registry import audit as audit_mod
from revreg.registry import policy, service, tokens
from revreg.registry.db import SchemaError
from revreg.server import wire

BLOCK = 1 << 20
RESUME_ATTEMPTS = 5
_ERRORS: dict[str, type[errors.RevregError]] = {
    cls.__name__: cls
    for cls in (
        errors.InputError,
        errors.FormatError,
        errors.IntegrityError,
        errors.SignatureError,
        errors.UnknownKeyError,
        errors.KeyringError,
        errors.CheckFailed,
        service.NotFound,
        service.ConflictError,
        service.StateError,
        policy.GateError,
        tokens.AuthError,
        tokens.ScopeError,
        SchemaError,
    )
}


@dataclass(frozen=True)
class RemoteLocation:
    url: str

    def describe(self) -> str:
        return self.url


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "http":
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise errors.InputError(f"{url}: plain http:// is allowed on loopback only; use https://")
    return url.rstrip("/")


class RemoteRegistry:
    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        self.location = RemoteLocation(_check_url(url))
        secret = token or os.environ.get("REVREG_TOKEN")
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._http = httpx.Client(
            base_url=self.location.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    # -- transport ---------------------------------------------------------------------------
    def _raise(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json().get("error") or {}
            kind, message = error.get("type", ""), error.get("message", "")
            if not message and "detail" in response.json():
                kind, message = "InputError", f"request refused: {response.json()['detail']}"
        except ValueError:
            kind, message = "", response.text[:200]
        cls = _ERRORS.get(kind, errors.RevregError)
        raise cls(f"{message} (HTTP {response.status_code} from {self.location.url})")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.RevregError(f"cannot reach the registry at {self.location.url}: {exc}") from exc
        self._raise(response)
        return response.json()

    def _upload(self, path: str, file: Path) -> Any:
        file = Path(file)
        try:
            with open(file, "rb") as fh:
                h, size = hashlib.sha256(), 0
                while block := fh.read(BLOCK):
                    h.update(block)
                    size += len(block)
        except OSError as exc:
            raise errors.InputError(f"cannot read {file}: {exc.strerror}") from exc

        def body() -> Iterator[bytes]:
            with open(file, "rb") as fh:
                while block := fh.read(BLOCK):
                    yield block

        headers = {
            "X-Revreg-Digest": "sha256:" + h.hexdigest(),
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
        }
        return self._call("PUT", path, content=body(), headers=headers)

    def _download(self, path: str, params: dict[str, Any], sink: BinaryIO) -> str:
        """Stream a download into `sink`, resuming with Range requests if the connection drops."""
        h, written = hashlib.sha256(), 0
        for attempt in range(RESUME_ATTEMPTS):
            headers = {"Range": f"bytes={written}-"} if written else {}
            try:
                with self._http.stream("GET", path, params=params, headers=headers) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise(response)
                    if written and response.status_code != 206:
                        raise errors.IntegrityError("the server ignored the resume request; pull again")
                    for chunk in response.iter_bytes(BLOCK):
                        sink.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
                return "sha256:" + h.hexdigest()
            except (httpx.TransportError, httpx.StreamError) as exc:
                if attempt == RESUME_ATTEMPTS - 1:
                    raise errors.RevregError(
                        f"download from {self.location.url} failed after {written} bytes: {exc}"
                    ) from exc
        raise AssertionError("unreachable")

    # -- the Registry interface --------------------------------------------------------------
    def push(self, path: Path) -> service.PushResult:
        doc = self._upload("/v1/artifacts", path)
        return service.PushResult(wire.version_info(doc["version"]), doc["created"])

    def pull(
        self, ref: str, dest: Path, fmt: str = "safetensors", allow_unpublished: bool = False
    ) -> service.VersionInfo:
        if fmt not in ("safetensors", "peft"):
            raise errors.InputError(f"unknown format {fmt!r}: use safetensors or peft")
        info = self.resolve(ref)
        publishers = self.trusted("publisher")
        params = {"ref": f"{info.name}@{info.digest}", "allow_unpublished": allow_unpublished}
        service.deliver(
            info, publishers, Path(dest), fmt, lambda sink: self._download("/v1/artifact", params, sink), "download"
        )
        return info

    def ls(self, name: str | None = None) -> list[service.VersionInfo]:
        return [wire.version_info(d) for d in self._call("GET", "/v1/versions", params={"name": name} if name else {})]

    def resolve(self, ref: Any, tags: bool = True) -> service.VersionInfo:
        return wire.version_info(self._call("GET", "/v1/resolve", params={"ref": str(ref)}))

    def show(self, ref: Any) -> service.VersionDetail:
        return wire.version_detail(self._call("GET", "/v1/show", params={"ref": str(ref)}))

    def tag(self, ref: Any, tag: str, allow_downgrade: bool = False) -> service.VersionInfo:
        body = {"ref": str(ref), "tag": tag, "allow_downgrade": allow_downgrade}
        return wire.version_info(self._call("POST", "/v1/tags", json=body))

    def publish(self, ref: Any) -> service.VersionInfo:
        return wire.version_info(self._call("POST", "/v1/publish", json={"ref": str(ref)}))

    def yank(self, ref: Any, reason: str) -> service.VersionInfo:
        return wire.version_info(self._call("POST", "/v1/yank", json={"ref": str(ref), "reason": reason}))

    def record_certification(self, ref: Any, envelope: bytes | str) -> service.VersionInfo:
        text = envelope.decode("utf-8") if isinstance(envelope, bytes) else envelope
        return wire.version_info(self._call("POST", "/v1/certifications", json={"ref": str(ref), "envelope": text}))

    def trusted(self, role: str, session: Any = None, include_revoked: bool = False) -> dict[str, TrustedKey]:
        rows = self._call("GET", "/v1/keys/pem", params={"role": role, "include_revoked": include_revoked})
        return {
            r["keyid"]: TrustedKey(r["name"], r["keyid"], load_public_pem(r["pem"].encode(), r["name"])) for r in rows
        }

    def key_records(self) -> list[service.KeyRecord]:
        return [wire.key_record(d) for d in self._call("GET", "/v1/keys")]

    def trust_key(self, pem: bytes, name: str, role: str) -> service.KeyRecord:
        return wire.key_record(
            self._call("POST", "/v1/keys/trust", json={"pem": pem.decode(), "name": name, "role": role})
        )

    def revoke_key(self, key: str, reason: str) -> list[service.KeyRecord]:
        return [wire.key_record(d) for d in self._call("POST", "/v1/keys/revoke", json={"key": key, "reason": reason})]

    def register_base(self, path: Path, name: str | None = None) -> tuple[service.BaseInfo, bool]:
        from revreg.artifacts.sources import identity_of_path

        doc = self._call("POST", "/v1/bases", json={"manifest": identity_of_path(path).to_dict(), "name": name})
        return wire.base_info(doc["base"]), doc["created"]

    def bases(self) -> list[service.BaseInfo]:
        return [wire.base_info(d) for d in self._call("GET", "/v1/bases")]

    def push_probes(self, path: Path) -> tuple[service.ProbeSetInfo, bool]:
        doc = self._upload("/v1/probes", path)
        return wire.probe_set_info(doc["probes"]), doc["created"]

    def probe_sets(self) -> list[service.ProbeSetInfo]:
        return [wire.probe_set_info(d) for d in self._call("GET", "/v1/probes")]

    def fetch_probes(self, ref: str, directory: Path) -> Path:
        out = Path(directory) / "remote.probes.safetensors"
        with open(out, "wb") as sink:
            self._download("/v1/probes/file", {"ref": ref}, sink)
        return out

    def audit_verify(self) -> audit_mod.ChainVerdict:
        return wire.chain_verdict(self._call("GET", "/v1/audit/verify"))

    def audit_log(self, subject: str | None = None) -> list[audit_mod.AuditEntryInfo]:
        params = {"subject": subject} if subject else {}
        return [wire.audit_entry(d) for d in self._call("GET", "/v1/audit/log", params=params)]

    def fsck(self, prune: bool = False) -> service.FsckReport:
        if prune:
            raise errors.InputError("fsck --prune runs on the server's machine, not over HTTP")
        return wire.fsck_report(self._call("GET", "/v1/fsck"))
