"""`revreg serve`: the registry over HTTP (FastAPI). Every rule is the Registry service's own:
the server authenticates, checks scopes, streams bytes and maps errors to HTTP statuses."""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# definition time, including the Principal dependency defined inside create_app.

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import revreg
from revreg.artifacts.artifact import check_name, check_version
from revreg.artifacts.canonical import strict_loads
from revreg.artifacts.identity import TensorManifest
from revreg.artifacts.stream import ArtifactStream
from revreg.errors import FormatError, InputError, IntegrityError, RevregError
from revreg.registry.api import AuthError, NotFound, ScopeError, http_status, to_json
from revreg.registry.db import HEAD
from revreg.registry.refs import Ref, parse_ref
from revreg.registry.service import Registry
from revreg.registry.store import LEND_BATCH, FileBlobStore, Pipeline, StagedBlob, Tap, check_digest
from revreg.registry.tokens import TokenInfo, Tokens

MAX_JSON = 1 << 20
UPLOAD_PATHS = ("/v1/artifacts", "/v1/probes")


MAX_HEADERS = 16 << 10  # bytes of request headers, all together
READ_TIMEOUT = 60.0  # seconds a request body may stall between two chunks
MIN_RATE = 16 << 10  # bytes per second a body must average ...
MIN_RATE_AFTER = 30.0  # ... once it has been arriving for this long (a trickle cannot hold a slot)
MAX_UPLOADS = 32  # uploads in flight on this server
# Headers whose every copy must mean the same thing to the Guard and to the endpoint behind it.
SINGLE_HEADERS = {"authorization", "content-length", "x-revreg-name", "x-revreg-digest", "transfer-encoding", "range"}
MAX_UPLOADS_PER_TOKEN = 4


async def _refuse(send: Send, status: int, kind: str, message: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer at once and close: the body (if any) is never read."""
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The server's front door, before any endpoint and before a byte of any body is read:
    header size; authentication (401 for a missing, unknown, expired or revoked token); for
    uploads, the scope for the name the request declares (X-Revreg-Name) and a cap on uploads
    in flight; then body limits that hold for chunked bodies too (413), and a read timeout
    between chunks (408). A refused request costs a header parse and one token lookup."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: Tokens,
        anonymous: TokenInfo | None,
        max_upload: int,
        read_timeout: float = READ_TIMEOUT,
        min_rate: float = MIN_RATE,
        min_rate_after: float = MIN_RATE_AFTER,
    ) -> None:
        self.app, self.tokens, self.anonymous, self.max_upload = app, tokens, anonymous, max_upload
        self.read_timeout, self.min_rate, self.min_rate_after = read_timeout, min_rate, min_rate_after
        self.uploads: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADERS:
            await _refuse(send, 431, "HeadersTooLarge", f"request headers over {MAX_HEADERS} bytes")
            return
        names = [k.lower() for k, _ in scope["headers"]]
        doubled = sorted({n.decode("latin-1") for n in names if names.count(n) > 1} & SINGLE_HEADERS)
        if doubled:
            await _refuse(send, 400, "InputError", f"header {doubled[0]} sent more than once")
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        try:
            who = await self._authenticate(scope, headers.get(b"authorization"))
            upload = scope["path"] in UPLOAD_PATHS
            if upload:
                self._authorize_upload(scope["path"], who, headers)
        except RevregError as exc:
            status = http_status(exc)
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await _refuse(send, status, type(exc).__name__, str(exc), extra)
            return
        scope.setdefault("state", {})["revreg_principal"] = who
        limit = self.max_upload if upload else MAX_JSON
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 20 or int(declared) > limit):
            await _refuse(send, 413, "PayloadTooLarge", f"request body over the limit of {limit} bytes")
            return
        if upload:
            total = sum(self.uploads.values())
            if total >= MAX_UPLOADS or self.uploads.get(who.name, 0) >= MAX_UPLOADS_PER_TOKEN:
                await _refuse(
                    send, 429, "TooManyUploads", "too many uploads in flight; retry later", [(b"retry-after", b"5")]
                )
                return
            self.uploads[who.name] = self.uploads.get(who.name, 0) + 1
        try:
            if upload or scope["method"] not in ("POST", "PUT", "PATCH"):
                await self._bounded(scope, receive, send, limit)
            else:
                await self._checked_json(scope, receive, send, limit)
        finally:
            if upload:
                self.uploads[who.name] -= 1

    async def _receive(self, receive: Receive, send: Send) -> Message | None:
        """The next body message, or None after answering 408 to a body that stalled."""
        try:  # a timer, not a task per message as wait_for makes: uploads arrive in 64 KiB messages
            async with asyncio.timeout(self.read_timeout):
                return await receive()
        except TimeoutError:
            await _refuse(send, 408, "RequestTimeout", f"no body data for {self.read_timeout:g} s")
            return None

    async def _checked_json(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """A JSON body (at most 1 MiB, already authorized) is read whole and parsed strictly here:
        numbers that overflow, lone surrogates, duplicate keys are a 400, never a 500 further in.
        The endpoint then reads the same bytes."""
        body = bytearray()
        while True:
            message = await self._receive(receive, send)
            if message is None or message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _refuse(send, 413, "PayloadTooLarge", f"request body over the limit of {limit} bytes")
                return
            if not message.get("more_body"):
                break
        if body:
            try:
                strict_loads(bytes(body), "request body")
            except FormatError as exc:
                await _refuse(send, 422, "FormatError", str(exc))  # 422 as FastAPI answers malformed JSON
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _authenticate(self, scope: Scope, authorization: bytes | None) -> TokenInfo:
        if authorization is None:
            if self.anonymous is not None and scope["method"] in ("GET", "HEAD"):
                return self.anonymous
            raise AuthError("authentication required: send Authorization: Bearer <token>")
        try:
            text = authorization.decode("ascii")
        except UnicodeDecodeError as exc:
            raise AuthError("the Authorization header is not ASCII") from exc
        scheme, _, secret = text.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthError("use Authorization: Bearer <token>")
        return await run_in_threadpool(self.tokens.authenticate, secret.strip())

    @staticmethod
    def _authorize_upload(path: str, who: TokenInfo, headers: dict[bytes, bytes]) -> None:
        if path == "/v1/probes":
            who.require_some("push")
            return
        raw = headers.get(b"x-revreg-name")
        if raw is None:
            raise InputError("an upload names the behavior it pushes: send X-Revreg-Name (revreg >= 0.2 does)")
        who.require("push", check_name(raw.decode("ascii", "replace")))

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        seen, refused = 0, False
        started = time.monotonic()

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            received = await self._receive(receive, send)
            if received is None:
                refused = True
                return {"type": "http.disconnect"}
            message = received
            seen += len(message.get("body", b""))
            elapsed = time.monotonic() - started
            if message.get("more_body") and elapsed > self.min_rate_after and seen / elapsed < self.min_rate:
                refused = True
                await _refuse(
                    send,
                    408,
                    "RequestTimeout",
                    f"body arriving at {seen / elapsed:.0f} B/s, under {self.min_rate:.0f} B/s",
                )
                return {"type": "http.disconnect"}
            if seen > limit:
                # Answer 413 now; the endpoint sees a disconnect and cleans up, its own reply is dropped.
                refused = True
                await _refuse(send, 413, "PayloadTooLarge", f"request body over the limit of {limit} bytes")
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)


ANONYMOUS = TokenInfo("anonymous", ("read:*",), datetime(2026, 1, 1, tzinfo=UTC), None, False)


RequestId = Annotated[int, FastAPIPath(ge=1, le=2**31 - 1)]


class UploadCheckBody(BaseModel):
    name: str = Field(max_length=128)
    digest: str | None = Field(default=None, max_length=80)
    version: str | None = Field(default=None, max_length=64)


class RefBody(BaseModel):
    ref: str = Field(max_length=512)


class TagBody(RefBody):
    tag: str = Field(max_length=64)
    allow_downgrade: bool = False


class YankBody(RefBody):
    reason: str = Field(min_length=1, max_length=4096)


class CertificationBody(RefBody):
    envelope: str = Field(max_length=MAX_JSON)


class TrustBody(BaseModel):
    pem: str = Field(max_length=16384)
    name: str = Field(max_length=64)
    role: str = Field(max_length=16)


class RevokeBody(BaseModel):
    key: str = Field(max_length=128)
    reason: str = Field(min_length=1, max_length=4096)


class QueueBody(RefBody):
    base: str = Field(max_length=4096)
    probes: str = Field(max_length=512)
    factory: str | None = Field(default=None, max_length=512)
    device: str = Field(default="cpu", max_length=32)
    cycles: int = Field(default=3, ge=1, le=1000)
    baselines: list[str] = Field(default_factory=list, max_length=16)


class WorkerBody(BaseModel):
    worker: str = Field(min_length=1, max_length=128)


class ClaimBody(WorkerBody):
    lease: float = Field(gt=0, le=86400)


class CompleteBody(WorkerBody):
    envelope: str = Field(max_length=MAX_JSON)


class FailBody(WorkerBody):
    message: str = Field(max_length=4000)


class BaseBody(BaseModel):
    manifest: dict[str, Any]
    name: str | None = Field(default=None, max_length=128)


class BlobFileResponse(FileResponse):
    """Starlette's FileResponse (Range requests included) reading 1 MiB at a time instead of
    64 KiB: each read is a hop to a worker thread and back, and the kernel copied 1 GiB into
    fresh 64 KiB buffers in 0.83 s here against 0.13 s into 1 MiB ones (benchmarks/bench_server.py)."""

    chunk_size = 1 << 20


def create_app(registry: Registry, anonymous_read: bool = False, max_upload: int = 64 << 30) -> FastAPI:
    tokens = Tokens(registry)
    app = FastAPI(
        title="revreg registry API",
        version=revreg.__version__,
        description="Signed, certified, reversible model behaviors. Authenticate with "
        "`Authorization: Bearer <token>` (see `revreg tokens`).",
    )
    anonymous = ANONYMOUS

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name what was wrong without echoing the input back (it may not even be encodable).
        where = "; ".join(
            ".".join(str(p) for p in e.get("loc", ())) + f": {e.get('msg', '')}" for e in exc.errors()[:5]
        )
        return JSONResponse({"error": {"type": "InputError", "message": f"invalid request: {where}"}}, 422)

    @app.exception_handler(RevregError)
    async def revreg_error(request: Request, exc: RevregError) -> JSONResponse:
        status = http_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}}, status, headers=headers)

    async def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> TokenInfo:
        checked = request.scope.get("state", {}).get("revreg_principal")
        if isinstance(checked, TokenInfo):
            return checked  # the Guard authenticated this request before its body was read
        if not authorization:
            if anonymous_read:
                return anonymous
            raise AuthError("authentication required: send Authorization: Bearer <token>")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthError("use Authorization: Bearer <token>")
        return await run_in_threadpool(tokens.authenticate, secret.strip())

    Principal = Annotated[TokenInfo, Depends(principal)]

    def blob_response(digest: str, headers: dict[str, str]) -> Response:
        """A file store serves Range requests from the file; other stores stream the object."""
        headers = {"X-Revreg-Digest": digest, **headers}
        if isinstance(registry.store, FileBlobStore):
            registry.store.open(digest).close()  # a regular file, or one clear error (never a hang)
            return BlobFileResponse(registry.store.path(digest), media_type="application/octet-stream", headers=headers)
        body = registry.store.open(digest)

        def chunks() -> Iterator[bytes]:
            with body:
                while block := body.read(1 << 20):
                    yield block

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)

    def name_of(ref: str) -> str:
        return parse_ref(ref).name

    def registry_actor(who: TokenInfo) -> Registry:
        return Registry(
            registry.engine, registry.location, registry.store, actor=f"token:{who.name}", gate=registry.gate
        )

    @app.get("/v1/info")
    def info(who: Principal) -> dict[str, Any]:
        return {
            "revreg": revreg.__version__,
            "schema": HEAD,
            "anonymous_read": anonymous_read,
            "token": who.name,
            "scopes": list(who.scopes),
        }

    @app.get("/v1/versions")
    def versions(who: Principal, name: Annotated[str | None, Query(max_length=128)] = None) -> list[dict[str, Any]]:
        if name is not None:
            who.require("read", name)
        elif not who.reads_something():
            raise ScopeError(f"token {who.name!r} has no read scope (its scopes: {', '.join(who.scopes)})")
        return to_json([v for v in registry.ls(name) if who.allows("read", v.name)])

    @app.get("/v1/resolve")
    def resolve(who: Principal, ref: Annotated[str, Query(max_length=512)]) -> dict[str, Any]:
        who.require("read", name_of(ref))
        return to_json(registry.resolve(ref))

    @app.get("/v1/show")
    def show(who: Principal, ref: Annotated[str, Query(max_length=512)]) -> dict[str, Any]:
        who.require("read", name_of(ref))
        return to_json(registry.show(ref))

    async def receive_upload(
        request: Request, digest: str | None, tap: Tap | None = None, echo: str | None = None
    ) -> tuple[StagedBlob, dict[str, str]]:
        """Stream the body into the store's staging area in one pass, off the event loop: the
        loop lends the body's chunks to the pipeline LEND_BATCH at a time (not copied; it waits
        on a thread only while the disk is behind); writing (fdatasync as it goes,
        fsync at the end), the sha256 and `tap` (an artifact's checks) run on the pipeline's
        threads, as a local push does. `digest`, when declared, must match what arrived. With
        `echo` ("blake3"), that digest of the body is computed beside them and returned for the
        answer (`received_blake3`): the client compares it with its own."""
        if digest is not None:
            check_digest(digest)
        if len(request.headers.getlist("x-revreg-echo")) > 1:
            raise InputError("send X-Revreg-Echo once (blake3)")
        algorithms = ("sha256", echo) if echo else ("sha256",)
        path, request.state.revreg_lock = registry.store.create_staging()
        try:
            with open(path, "r+b", buffering=0) as sink:
                pipe = Pipeline(sink, durable=True, tap=tap, algorithms=algorithms)
                try:
                    refused: RevregError | None = None
                    batch: list[bytes] = []

                    async def hand_over(chunks: list[bytes]) -> RevregError | None:
                        try:  # the chunks themselves go through the stages: no copy on the loop
                            if not pipe.lend(chunks, wait=False):
                                await run_in_threadpool(pipe.lend, chunks)  # the disk is behind
                        except RevregError as exc:  # the header was refused: nothing more is written
                            return exc
                        return None

                    async for chunk in request.stream():
                        if refused is not None:
                            continue  # read the rest (the body limit still answers 413), store nothing
                        batch.append(chunk)
                        if sum(map(len, batch)) >= LEND_BATCH:
                            refused, batch = await hand_over(batch), []
                    if batch and refused is None:
                        refused = await hand_over(batch)
                    if refused is not None:
                        raise refused
                    received, size = await run_in_threadpool(pipe.close)
                except ClientDisconnect as exc:
                    raise IntegrityError(f"upload interrupted after {pipe.received} bytes; nothing was stored") from exc
                finally:
                    pipe.abort()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if digest is not None and received != digest:
            path.unlink(missing_ok=True)
            raise IntegrityError(
                f"upload digest mismatch: declared {digest}, received {received} ({size} bytes); nothing was stored"
            )
        return StagedBlob(path, received, size), {f"received_{a}": pipe.digests[a] for a in algorithms[1:]}

    async def with_upload(
        request: Request,
        digest: str | None,
        store: Callable[[StagedBlob], Any],
        tap: Tap | None = None,
        echo: str | None = None,
    ) -> tuple[Any, dict[str, str]]:
        """(what `store` returned, the echoed digests of the body for the answer)."""
        try:
            staged, echoed = await receive_upload(request, digest, tap, echo)
            try:
                return await run_in_threadpool(store, staged), echoed
            finally:
                staged.path.unlink(missing_ok=True)
        finally:
            lock = getattr(request.state, "revreg_lock", None)
            if lock is not None:
                os.close(lock)  # the writer lock lasts until the row has committed (or nothing was stored)

    @app.put("/v1/artifacts")
    async def push(
        request: Request,
        who: Principal,
        x_revreg_digest: Annotated[str | None, Header()] = None,
        x_revreg_name: Annotated[str | None, Header(max_length=128)] = None,
        x_revreg_echo: Annotated[Literal["blake3"] | None, Header()] = None,
    ) -> dict[str, Any]:
        """Upload a signed artifact (the raw file as the body). `X-Revreg-Name` names the behavior
        before the body is read (the push scope is checked on it); the manifest must agree.
        `X-Revreg-Echo: blake3` asks for the BLAKE3 of the body as received (`received_blake3`),
        for the client to compare with its own."""
        reg = registry_actor(who)

        def authorize(name: str) -> None:
            if x_revreg_name is not None and name != x_revreg_name:
                raise InputError(f"the upload declared {x_revreg_name!r} but the artifact is {name!r}")
            who.require("push", name)

        # The body is checked as it arrives: its header parsed, the name authorized and the
        # signature verified before any tensor byte, then every tensor hashed on the way.
        length = request.headers.get("content-length")
        stream = ArtifactStream(
            "upload",
            int(length) if length is not None and length.isdigit() else None,
            lambda artifact: reg.signed_by(artifact, "upload", authorize),
        )
        result, echoed = await with_upload(
            request, x_revreg_digest, lambda staged: reg.push_streamed(staged, stream), stream, x_revreg_echo
        )
        return {"created": result.created, "version": to_json(result.version), **echoed}

    @app.post("/v1/uploads/check")
    def upload_check(who: Principal, body: UploadCheckBody) -> dict[str, Any]:
        """Before an upload: is the client allowed to push this name, and is this version (by
        `version`) or these exact bytes (by `digest`) stored already? By version, a token that
        may also read the name gets the stored version (and its digest) whether or not its blob
        is present, so the client can tell "already present" from a conflict without sending
        the body; a push-only token gets only whether it exists (by version) or nothing (by
        digest), and proves it holds the bytes by sending them."""
        who.require("push", check_name(body.name))
        if (body.digest is None) == (body.version is None):
            raise InputError("ask about a version or a digest: send exactly one of `version` and `digest`")
        if body.digest is not None:
            check_digest(body.digest)
            if not who.allows("read", body.name):
                # Knowing a digest is not holding the bytes: a push-only token learns nothing
                # here, and uploads; the upload's answer is the version its bytes are.
                return {"stored": False, "version": None}
            try:
                info = registry.resolve(f"{body.name}@{body.digest}")
            except NotFound:
                return {"stored": False, "version": None}
            stored = registry.store.exists(body.digest)
            return {"stored": stored, "version": to_json(info) if stored else None}
        try:
            info = registry.resolve(Ref(body.name, check_version(body.version or "")), tags=False)
        except NotFound:
            return {"stored": False, "version": None, "exists": False}
        if not who.allows("read", body.name):
            # A push-only token learns that the version exists (its push would conflict or be a
            # no-op anyway), not its record: it asks again by the digest of the bytes it holds.
            return {"stored": False, "version": None, "exists": True}
        return {"stored": registry.store.exists(info.digest), "version": to_json(info), "exists": True}

    @app.get("/v1/artifact")
    def artifact(
        who: Principal,
        ref: Annotated[str, Query(max_length=512)],
        allow_unpublished: bool = False,
        allow_yanked: bool = False,
    ) -> Response:
        """Download a version's artifact; supports Range requests so an interrupted pull resumes."""
        who.require("read", name_of(ref))
        if allow_yanked and who.name == ANONYMOUS.name:
            # Each yanked pull writes an audit row: that needs someone to write it down as.
            raise AuthError("pulling a yanked version needs a token (it is recorded in the audit log)")
        info = registry_actor(who).check_pull(ref, allow_unpublished, allow_yanked)
        return blob_response(info.digest, {"X-Revreg-Ref": info.ref})

    @app.post("/v1/tags")
    def tag(who: Principal, body: TagBody) -> dict[str, Any]:
        # Tagging answers with the version's record (and its refusals name states and tags):
        # it needs read as well as push on the namespace.
        who.require("push", name_of(body.ref))
        who.require("read", name_of(body.ref))
        return to_json(registry_actor(who).tag(body.ref, body.tag, body.allow_downgrade))

    @app.post("/v1/publish")
    def publish(who: Principal, body: RefBody) -> dict[str, Any]:
        who.require("publish", name_of(body.ref))
        who.require("read", name_of(body.ref))  # it answers with the version's record
        return to_json(registry_actor(who).publish(body.ref))

    @app.post("/v1/yank")
    def yank(who: Principal, body: YankBody) -> dict[str, Any]:
        who.require("publish", name_of(body.ref))
        who.require("read", name_of(body.ref))  # it answers with the version's record
        return to_json(registry_actor(who).yank(body.ref, body.reason))

    @app.post("/v1/certifications")
    def certify(who: Principal, body: CertificationBody) -> dict[str, Any]:
        """Record a certification signed by a verifier key (made on the client's machine)."""
        who.require("certify", name_of(body.ref))
        return to_json(registry_actor(who).record_certification(body.ref, body.envelope))

    @app.get("/v1/keys")
    def keys(who: Principal) -> list[dict[str, Any]]:
        who.require_some("read")
        return to_json(registry.key_records())

    @app.get("/v1/keys/pem")
    def key_pems(
        who: Principal, role: Annotated[Literal["publisher", "verifier"], Query()], include_revoked: bool = False
    ) -> list[dict[str, str]]:
        who.require_some("read")
        from cryptography.hazmat.primitives import serialization

        return [
            {
                "name": k.name,
                "keyid": k.keyid,
                "pem": k.public_key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode(),
            }
            for k in registry.trusted(role, include_revoked=include_revoked).values()
        ]

    @app.post("/v1/keys/trust")
    def trust(who: Principal, body: TrustBody) -> dict[str, Any]:
        who.require("admin")
        return to_json(registry_actor(who).trust_key(body.pem.encode(), body.name, body.role))

    @app.post("/v1/keys/revoke")
    def revoke(who: Principal, body: RevokeBody) -> list[dict[str, Any]]:
        who.require("admin")
        return to_json(registry_actor(who).revoke_key(body.key, body.reason))

    @app.get("/v1/bases")
    def bases(who: Principal) -> list[dict[str, Any]]:
        who.require_some("read")
        return to_json(registry.bases())

    @app.post("/v1/bases")
    def register_base(who: Principal, body: BaseBody) -> dict[str, Any]:
        who.require_some("push")
        info, created = registry_actor(who).register_manifest(TensorManifest.from_dict(body.manifest), body.name)
        return {"created": created, "base": to_json(info)}

    @app.get("/v1/probes")
    def probe_sets(who: Principal) -> list[dict[str, Any]]:
        who.require_some("read")
        return to_json(registry.probe_sets())

    @app.put("/v1/probes")
    async def push_probes(
        request: Request,
        who: Principal,
        x_revreg_digest: Annotated[str | None, Header()] = None,
        x_revreg_echo: Annotated[Literal["blake3"] | None, Header()] = None,
    ) -> dict[str, Any]:
        """Upload a probe set (the raw file as the body); `X-Revreg-Echo` as for an artifact."""
        who.require_some("push")
        reg = registry_actor(who)
        (info, created), echoed = await with_upload(
            request, x_revreg_digest, lambda staged: reg.push_probes_staged(staged, "upload"), echo=x_revreg_echo
        )
        return {"created": created, "probes": to_json(info), **echoed}

    @app.get("/v1/probes/digest")
    def probe_digest(who: Principal, ref: Annotated[str, Query(max_length=512)]) -> dict[str, str]:
        who.require_some("read")
        return {"digest": registry.probe_digest(ref)}

    @app.get("/v1/probes/file")
    def probe_file(who: Principal, ref: Annotated[str, Query(max_length=512)]) -> Response:
        who.require_some("read")
        return blob_response(registry.probe_digest(ref), {})

    def owner(who: TokenInfo, worker: str) -> str:
        # A worker is known by its token too, so one token's workers cannot close another's claims.
        return f"token:{who.name}/{worker}"

    @app.post("/v1/queue")
    def request_certification(who: Principal, body: QueueBody) -> dict[str, Any]:
        """Queue a certification request; the version and probe set are pinned to digests now."""
        who.require("certify", name_of(body.ref))
        request = registry_actor(who).request_certification(
            body.ref, body.base, body.probes, body.factory, body.device, body.cycles, tuple(body.baselines)
        )
        return to_json(request)

    @app.get("/v1/queue")
    def requests(who: Principal, state: Annotated[str | None, Query(max_length=16)] = None) -> list[dict[str, Any]]:
        who.require("read")
        return to_json([r for r in registry.requests(state) if who.allows("read", name_of(r.ref))])

    @app.post("/v1/queue/claim")
    def claim(who: Principal, body: ClaimBody) -> dict[str, Any] | None:
        who.require("certify")
        request = registry_actor(who).claim_request(owner(who, body.worker), body.lease)
        return None if request is None else to_json(request)

    @app.post("/v1/queue/{request_id}/renew")
    def renew(who: Principal, request_id: RequestId, body: ClaimBody) -> dict[str, bool]:
        who.require("certify")
        return {"held": registry.renew_lease(request_id, owner(who, body.worker), body.lease)}

    @app.post("/v1/queue/{request_id}/complete")
    def complete(who: Principal, request_id: RequestId, body: CompleteBody) -> dict[str, Any] | None:
        who.require("certify")
        info = registry_actor(who).complete_request(request_id, owner(who, body.worker), body.envelope)
        return None if info is None else to_json(info)

    @app.post("/v1/queue/{request_id}/fail")
    def fail(who: Principal, request_id: RequestId, body: FailBody) -> dict[str, bool]:
        who.require("certify")
        registry_actor(who).fail_request(request_id, owner(who, body.worker), body.message)
        return {"ok": True}

    @app.get("/v1/audit/verify")
    def audit_verify(who: Principal) -> dict[str, Any]:
        who.require("read")
        return to_json(registry.audit_verify())

    @app.get("/v1/audit/log")
    def audit_log(who: Principal, subject: Annotated[str | None, Query(max_length=512)] = None) -> list[dict[str, Any]]:
        who.require("read")
        return to_json(registry.audit_log(subject))

    @app.get("/v1/fsck")
    def fsck(who: Principal) -> dict[str, Any]:
        who.require("admin")
        return to_json(registry.fsck())

    return app


def asgi(
    registry: Registry,
    anonymous_read: bool = False,
    max_upload: int = 64 << 30,
    read_timeout: float = READ_TIMEOUT,
    min_rate: float = MIN_RATE,
    min_rate_after: float = MIN_RATE_AFTER,
) -> ASGIApp:
    anonymous = ANONYMOUS if anonymous_read else None
    app = create_app(registry, anonymous_read, max_upload)
    return Guard(app, Tokens(registry), anonymous, max_upload, read_timeout, min_rate, min_rate_after)
