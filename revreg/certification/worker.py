"""Certification workers: claim queued requests, run the verifier, sign, record; one per GPU."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from revreg.artifacts.attestation import sign_certification
from revreg.artifacts.keys import Signer
from revreg.errors import RevregError
from revreg.registry.queue import Queue, Request
from revreg.registry.service import Registry
from revreg.verifier.protocol import VerificationResult, verify_files


def certify_request(registry: Registry, request: Request, signer: Signer) -> tuple[bytes, VerificationResult]:
    """Run the protocol for one request, as `revreg certify` would, and sign the result."""
    with tempfile.TemporaryDirectory(prefix="revreg-worker-") as tmp:
        behavior_path = Path(tmp) / "behavior.safetensors"
        info = registry.pull(request.ref, behavior_path, allow_unpublished=True)
        probes_path = (
            Path(request.probes) if Path(request.probes).is_file() else registry.fetch_probes(request.probes, Path(tmp))
        )
        result = verify_files(
            behavior_path,
            registry.trusted("publisher"),
            probes_path,
            Path(request.base),
            request.factory,
            request.device,
            request.cycles,
            request.baselines,
        )
    return sign_certification(info.ref, info.digest, result.to_dict(), signer), result


class _Lease:
    """Renews a claim's lease in the background until stopped."""

    def __init__(self, queue: Queue, request: Request, worker: str, lease: float) -> None:
        self._stop = threading.Event()
        self.lost = False

        def renew() -> None:
            while not self._stop.wait(lease / 3):
                if not queue.heartbeat(request, worker, lease):
                    self.lost = True
                    return

        self._thread = threading.Thread(target=renew, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_worker(
    registry: Registry,
    signer: Signer,
    worker: str,
    lease: float = 300.0,
    poll: float = 2.0,
    drain: bool = False,
    log: Callable[[str], None] = print,
) -> int:
    """Process requests until stopped (or, with `drain`, until the queue has none left)."""
    queue = Queue(registry)
    done = 0
    while True:
        request = queue.claim(worker, lease)
        if request is None:
            if drain:
                return done
            time.sleep(poll)
            continue
        log(f"{worker}: claimed request {request.id} ({request.ref}, attempt {request.attempts})")
        renewal = _Lease(queue, request, worker, lease)
        try:
            envelope, result = certify_request(registry, request, signer)
        except RevregError as exc:
            renewal.stop()
            queue.fail(request, worker, str(exc))
            log(f"{worker}: request {request.id} failed: {exc}")
            continue
        renewal.stop()
        recorded = queue.complete(request, worker, envelope)
        if recorded is None:
            log(f"{worker}: lost the lease on request {request.id}; its result was discarded")
            continue
        done += 1
        log(f"{worker}: request {request.id} {result.verdict}: {recorded.ref} is {recorded.state}")
