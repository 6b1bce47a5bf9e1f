"""One certification: resolve once, pin NAME@DIGEST, check behavior, probe set and base against
their digests, run the protocol, sign a statement about the pinned digest, record it there.

A tag that moves while this runs changes nothing: every later step names the digest."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from revreg import progress
from revreg.artifacts.artifact import file_digest
from revreg.artifacts.attestation import sign_certification
from revreg.artifacts.keys import Signer
from revreg.errors import InputError, IntegrityError
from revreg.registry.api import RegistryAPI, VersionInfo

if TYPE_CHECKING:
    from revreg.verifier.protocol import VerificationResult


@dataclass(frozen=True)
class ProbeSource:
    """Where the probe set comes from, decided once by the caller: a local file, or a digest
    in the registry. Never re-decided later on another machine's disk."""

    path: Path | None = None
    digest: str | None = None

    @classmethod
    def choose(cls, registry: RegistryAPI | None, given: str) -> ProbeSource:
        """A path when `given` names an existing file, else a registry probe ref pinned now."""
        if Path(given).is_file():
            return cls(path=Path(given))
        if registry is None:
            raise InputError(f"--probes {given!r} is not a file, and no registry was given to look it up")
        return cls(digest=registry.probe_digest(given))

    def materialize(self, registry: RegistryAPI | None, directory: Path) -> tuple[Path, str]:
        """A local file of the probe set and its digest. A registry copy is fetched by digest, and
        `fetch_probes` refuses bytes that do not hash to it (both implementations)."""
        if self.path is not None:
            return self.path, file_digest(self.path)
        assert self.digest is not None and registry is not None
        return registry.fetch_probes(self.digest, directory), self.digest


@dataclass(frozen=True)
class Certified:
    version: VersionInfo  # the pinned version, as resolved before anything ran
    result: VerificationResult
    envelope: bytes
    recorded: VersionInfo | None  # None when only signed (the worker records with its lease)


def check_verifier(registry: RegistryAPI, signer: Signer) -> None:
    if signer.keyid not in registry.trusted("verifier"):
        raise InputError(
            f"key {signer.name} is not a trusted verifier in this registry: "
            f"`revreg keys trust {signer.name} --role verifier`"
        )


def run_pinned(
    registry: RegistryAPI,
    version: VersionInfo,
    probes: ProbeSource,
    base: Path,
    signer: Signer,
    factory: str | None = None,
    device: str = "cpu",
    cycles: int = 3,
    baselines: Sequence[str] = (),
) -> tuple[VerificationResult, bytes]:
    """Run the protocol on the pinned version and sign the result about its digest."""
    from revreg.verifier.protocol import verify_files

    with tempfile.TemporaryDirectory(prefix="revreg-certify-") as tmp:
        behavior_path = Path(tmp) / "behavior.safetensors"
        pulled = registry.pull(version.pinned, behavior_path, allow_unpublished=True)
        if pulled.digest != version.digest:
            raise IntegrityError(f"asked for {version.pinned}, the registry delivered {pulled.digest}")
        probes_path, probes_digest = probes.materialize(registry, Path(tmp))
        with progress.task(
            f"verify {version.ref}: load, determinism check, {cycles} cycles, {len(baselines)} baselines"
        ):
            result = verify_files(
                behavior_path,
                registry.trusted("publisher"),
                probes_path,
                Path(base),
                factory,
                device,
                cycles,
                tuple(baselines),
            )
    # The verifier names what it ran; a statement whose predicate and subject disagree is never signed.
    ran = result.behavior.get("digest")
    if ran != version.digest:
        raise IntegrityError(f"the verifier ran {ran}, not the pinned {version.digest}; nothing was signed")
    if result.probes.get("digest") != probes_digest:
        raise IntegrityError(f"the verifier ran probe set {result.probes.get('digest')}, not {probes_digest}")
    envelope = sign_certification(version.ref, version.digest, result.to_dict(), signer)
    return result, envelope


def certify(
    registry: RegistryAPI,
    ref: str,
    probes: ProbeSource,
    base: Path,
    signer: Signer,
    factory: str | None = None,
    device: str = "cpu",
    cycles: int = 3,
    baselines: Sequence[str] = (),
) -> Certified:
    """Certify REF: resolved once; every verdict (PASS, FAIL, INCONCLUSIVE) is signed and recorded
    against the pinned digest."""
    check_verifier(registry, signer)
    version = registry.resolve(ref)
    result, envelope = run_pinned(registry, version, probes, base, signer, factory, device, cycles, baselines)
    recorded = registry.record_certification(version.pinned, envelope)
    return Certified(version, result, envelope, recorded)
