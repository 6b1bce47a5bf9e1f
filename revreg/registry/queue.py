"""The certification queue: requests recorded in the registry database, claimed by workers
under a lease (PostgreSQL: FOR UPDATE SKIP LOCKED), re-claimable when a worker dies.

Exactly once: a worker records its certification and closes its request in one transaction,
and only while it still holds the lease; a worker whose lease was taken over discards its result.
A request is pinned when it is made: the version as NAME@DIGEST, the probe set as its digest.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select

from revreg.errors import InputError
from revreg.registry import audit
from revreg.registry.api import Request, VersionInfo
from revreg.registry.models import CertRequest
from revreg.registry.refs import parse_ref

if TYPE_CHECKING:
    from revreg.registry.service import Registry

MAX_ATTEMPTS = 3
STATES = ("queued", "running", "done", "failed")


def _request(row: CertRequest) -> Request:
    return Request(
        row.id,
        row.ref,
        row.base,
        row.factory,
        row.probes,
        row.device,
        row.cycles,
        tuple(json.loads(row.baselines)),
        row.state,
        row.attempts,
        row.lease_owner,
        row.result,
    )


class Queue:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def request(
        self,
        ref: str,
        base: str,
        probes: str,
        factory: str | None = None,
        device: str = "cpu",
        cycles: int = 3,
        baselines: tuple[str, ...] = (),
    ) -> Request:
        if cycles < 1:
            raise InputError(f"cycles must be at least 1, not {cycles}")
        info = self.registry.resolve(ref)
        probe_digest = self.registry.probe_digest(probes)
        with self.registry.transaction() as s:
            row = CertRequest(
                version_id=self.registry.find_version(s, parse_ref(info.pinned)).id,
                ref=info.pinned,
                base=base,
                factory=factory,
                probes=probe_digest,
                device=device,
                cycles=cycles,
                baselines=json.dumps(list(baselines)),
                state="queued",
                requested_by=self.registry.actor,
                requested_at=datetime.now(UTC),
                attempts=0,
            )
            s.add(row)
            s.flush()
            audit.append(
                s,
                self.registry.actor,
                "certify.request",
                info.ref,
                {"request": row.id, "device": device, "digest": info.digest, "probes": probe_digest},
            )
            return _request(row)

    def claim(self, worker: str, lease: float) -> Request | None:
        """The oldest queued request, or one whose worker's lease ran out; None if there is none."""
        now = datetime.now(UTC)
        with self.registry.transaction() as s:
            q = (
                select(CertRequest)
                .where(
                    or_(
                        CertRequest.state == "queued",
                        (CertRequest.state == "running") & (CertRequest.lease_expires_at < now),
                    )
                )
                .order_by(CertRequest.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            row = s.scalars(q).first()
            if row is None:
                return None
            if row.attempts >= MAX_ATTEMPTS:
                row.state, row.result, row.finished_at = "failed", f"gave up after {row.attempts} attempts", now
                audit.append(
                    s, self.registry.actor, "certify.failed", row.ref, {"request": row.id, "reason": row.result}
                )
                return None
            row.state, row.lease_owner = "running", worker
            row.lease_expires_at = now + timedelta(seconds=lease)
            row.attempts += 1
            return _request(row)

    def heartbeat(self, request_id: int, worker: str, lease: float) -> bool:
        """Extend the lease; False if it was lost (another worker took the request over)."""
        with self.registry.transaction() as s:
            row = s.get(CertRequest, request_id, with_for_update=True)
            if row is None or row.state != "running" or row.lease_owner != worker:
                return False
            row.lease_expires_at = datetime.now(UTC) + timedelta(seconds=lease)
            return True

    def complete(self, request_id: int, worker: str, envelope: bytes | str) -> VersionInfo | None:
        """Record the certification and close the request together, if the lease is still ours."""
        with self.registry.transaction() as s:
            row = s.get(CertRequest, request_id, with_for_update=True)
            if row is None or row.state != "running" or row.lease_owner != worker:
                return None
            info = self.registry.record_certification_in(s, parse_ref(row.ref), envelope)
            row.state, row.result, row.finished_at = "done", info.state, datetime.now(UTC)
            return info

    def fail(self, request_id: int, worker: str, message: str) -> None:
        with self.registry.transaction() as s:
            row = s.get(CertRequest, request_id, with_for_update=True)
            if row is None or row.lease_owner != worker or row.state != "running":
                return
            row.state, row.result, row.finished_at = "failed", message[:4000], datetime.now(UTC)
            audit.append(
                s, self.registry.actor, "certify.failed", row.ref, {"request": row.id, "reason": message[:500]}
            )

    def list(self, state: str | None = None) -> list[Request]:
        if state is not None and state not in STATES:
            raise InputError(f"unknown request state {state!r}: one of {', '.join(STATES)}")
        with self.registry.reading() as s:
            q = select(CertRequest).order_by(CertRequest.id)
            if state:
                q = q.where(CertRequest.state == state)
            return [_request(r) for r in s.scalars(q)]
