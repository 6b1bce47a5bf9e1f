"""Certification workers: claim queued requests, run the verifier on the pinned version, sign,
record; one per GPU. Works against any registry (SQL or `--registry http(s)://`)."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from revreg.artifacts.keys import Signer
from revreg.certification.certify import ProbeSource, check_verifier, run_pinned
from revreg.errors import RevregError
from revreg.registry.api import RegistryAPI, Request, VersionInfo


class _Lease:
    """Renews a claim's lease in the background until stopped."""

    def __init__(self, registry: RegistryAPI, request: Request, worker: str, lease: float) -> None:
        self._stop = threading.Event()
        self.lost = False

        def renew() -> None:
            while not self._stop.wait(lease / 3):
                try:
                    held = registry.renew_lease(request.id, worker, lease)
                except RevregError:
                    continue  # a failed renewal is retried; the lease only runs out if they all fail
                if not held:
                    self.lost = True
                    return

        self._thread = threading.Thread(target=renew, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def process(registry: RegistryAPI, request: Request, signer: Signer, worker: str) -> VersionInfo | None:
    """Certify one claimed request. Any verdict is recorded; an error ends the request `failed`
    with its reason. Never raises for a bad request: one request cannot stop the worker."""
    try:
        version = registry.resolve(request.ref)
        _, envelope = run_pinned(
            registry,
            version,
            ProbeSource(digest=request.probes),
            Path(request.base),
            signer,
            request.factory,
            request.device,
            request.cycles,
            request.baselines,
        )
    except RevregError as exc:
        registry.fail_request(request.id, worker, str(exc))
        return None
    except Exception as exc:  # a crash of the verifier on one input must not stop the worker
        where = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"internal error {type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
        registry.fail_request(request.id, worker, reason)
        return None
    try:
        return registry.complete_request(request.id, worker, envelope)
    except RevregError as exc:  # e.g. the verifier key was revoked while it ran
        registry.fail_request(request.id, worker, f"the registry refused the result: {exc}")
        return None


def run_worker(
    registry: RegistryAPI,
    signer: Signer,
    worker: str,
    lease: float = 300.0,
    poll: float = 2.0,
    drain: bool = False,
    log: Callable[[str], None] = print,
) -> int:
    """Process requests until stopped (or, with `drain`, until no request is queued or running)."""
    check_verifier(registry, signer)
    done = 0
    while True:
        request = registry.claim_request(worker, lease)
        if request is None:
            # Draining ends when nothing is left to do; a request another worker still holds may
            # come back to the queue when its lease runs out (that worker died), so wait for it.
            if drain and not registry.requests("queued") and not registry.requests("running"):
                return done
            time.sleep(poll)
            continue
        log(f"{worker}: claimed request {request.id} ({request.ref}, attempt {request.attempts})")
        renewal = _Lease(registry, request, worker, lease)
        try:
            recorded = process(registry, request, signer, worker)
        finally:
            renewal.stop()
        if recorded is None:
            state = next((r for r in registry.requests() if r.id == request.id), None)
            why = state.result if state is not None and state.state == "failed" else "its lease was lost"
            log(f"{worker}: request {request.id} not certified: {why}")
            continue
        done += 1
        log(f"{worker}: request {request.id}: {recorded.ref} is {recorded.state}")
