"""The certification queue: requests recorded in the registry database, claimed by workers
under a lease (PostgreSQL: FOR UPDATE SKIP LOCKED), re-claimable when a worker dies.

Exactly once: a worker records its certification and closes its request in one transaction,
and only while it still holds the lease; a worker whose lease was taken over discards its result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from revreg.registry import audit
from revreg.registry.models import CertRequest
from revreg.registry.refs import parse_ref
from revreg.registry.service import Registry, VersionInfo

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Request:
    id: int
    ref: str
    base: str
    factory: str | None
    probes: str
    device: str
    cycles: int
    baselines: tuple[str, ...]
    state: str
    attempts: int
    lease_owner: str | None
    result: str | None


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
        info = self.registry.resolve(ref)
        with self.registry._tx() as s:
            row = CertRequest(
                version_id=self._version_id(s, info),
                ref=info.ref,
                base=base,
                factory=factory,
                probes=probes,
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
            audit.append(s, self.registry.actor, "certify.request", info.ref, {"request": row.id, "device": device})
            return _request(row)

    def _version_id(self, s: Session, info: VersionInfo) -> int:
        return self.registry._find(s, parse_ref(f"{info.name}@{info.digest}")).id

    def claim(self, worker: str, lease: float) -> Request | None:
        """The oldest queued request, or one whose worker's lease ran out; None if there is none."""
        now = datetime.now(UTC)
        with self.registry._tx() as s:
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

    def heartbeat(self, request: Request, worker: str, lease: float) -> bool:
        """Extend the lease; False if it was lost (another worker took the request over)."""
        with self.registry._tx() as s:
            row = s.get(CertRequest, request.id, with_for_update=True)
            if row is None or row.state != "running" or row.lease_owner != worker:
                return False
            row.lease_expires_at = datetime.now(UTC) + timedelta(seconds=lease)
            return True

    def complete(self, request: Request, worker: str, envelope: bytes) -> VersionInfo | None:
        """Record the certification and close the request together, if the lease is still ours."""
        with self.registry._tx() as s:
            row = s.get(CertRequest, request.id, with_for_update=True)
            if row is None or row.state != "running" or row.lease_owner != worker:
                return None
            info = self.registry.record_certification_in(s, parse_ref(row.ref), envelope)
            row.state, row.result, row.finished_at = "done", info.state, datetime.now(UTC)
            return info

    def fail(self, request: Request, worker: str, message: str) -> None:
        with self.registry._tx() as s:
            row = s.get(CertRequest, request.id, with_for_update=True)
            if row is None or row.lease_owner != worker or row.state != "running":
                return
            row.state, row.result, row.finished_at = "failed", message[:4000], datetime.now(UTC)
            audit.append(
                s, self.registry.actor, "certify.failed", row.ref, {"request": row.id, "reason": message[:500]}
            )

    def list(self, state: str | None = None) -> list[Request]:
        with Session(self.registry.engine) as s:
            q = select(CertRequest).order_by(CertRequest.id)
            if state:
                q = q.where(CertRequest.state == state)
            return [_request(r) for r in s.scalars(q)]

    def counts(self) -> dict[str, Any]:
        out: dict[str, int] = {}
        for r in self.list():
            out[r.state] = out.get(r.state, 0) + 1
        return out
