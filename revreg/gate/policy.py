"""Gate policies: small rule objects with `verify(evidence)`, combined with AllOf.

A policy file is TOML with one [policy] table; each key is a rule:

    [policy]
    publishers = ["alice"]          # the artifact's signer, by key name or key id
    verifiers = ["vera"]            # the certification's signer, by key name or key id
    device = "cuda"                 # cpu, cuda or any
    min_cycles = 3
    bitwise = true                  # identity, full state and outputs restored bit for bit
    min_effect = 1e-4               # the behavior's divergence while attached (KL or MSE)
    probe_set = "smoke"             # probe set name, NAME@sha256:..., or sha256:...
    max_age = "30d"                 # certification age: s, m, h or d

Always part of every gate, whatever the file says: the version is `certified` or `published`
(never pending, rejected or yanked), its newest certification by a trusted verifier says PASS,
and no revoked key counts (a revoked signer fails the gate; a revoked verifier's certifications
are not evidence). `no_revoked_keys = true` is accepted for old policy files and changes nothing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from revreg.artifacts.predicate import metric
from revreg.durations import parse_duration
from revreg.errors import InputError


@dataclass(frozen=True)
class KeyFacts:
    keyid: str
    name: str | None
    revoked: bool


@dataclass(frozen=True)
class CertificationEvidence:
    """One verified certification of the version under the gate."""

    predicate: dict[str, Any]
    verifier: KeyFacts
    certified_at: datetime


@dataclass(frozen=True)
class Evidence:
    ref: str
    digest: str
    state: str
    signer: KeyFacts
    certification: CertificationEvidence | None
    now: datetime
    revoked_verifiers: tuple[KeyFacts, ...] = ()  # verifiers whose certifications were set aside


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    message: str


class Rule:
    name: str = ""

    def verify(self, evidence: Evidence) -> RuleResult:
        raise NotImplementedError

    def result(self, passed: bool, message: str) -> RuleResult:
        return RuleResult(self.name, passed, message)


def _key_label(k: KeyFacts) -> str:
    return f"{k.name or '?'} ({k.keyid[:19]}…)"


GATED_STATES = ("certified", "published")


class Certified(Rule):
    """Always part of a gate: the version is certified or published, and the newest certification
    of exactly this digest by an unrevoked verifier says PASS."""

    name = "certified"

    def verify(self, e: Evidence) -> RuleResult:
        if e.state not in GATED_STATES:
            return self.result(False, f"{e.ref} is {e.state}; only a certified or published version passes")
        if e.certification is None:
            return self.result(False, f"{e.ref} has no certification by a trusted, unrevoked verifier key")
        verdict = e.certification.predicate.get("verdict")
        return self.result(verdict == "PASS", f"verdict {verdict} by {_key_label(e.certification.verifier)}")


@dataclass
class KeyList(Rule):
    allowed: list[str]
    whose: str  # "publisher" or "verifier"

    def __post_init__(self) -> None:
        self.name = f"{self.whose}s"
        if not self.allowed:
            raise InputError(f"policy rule {self.name} must list at least one key name or id")

    def verify(self, e: Evidence) -> RuleResult:
        key = e.signer if self.whose == "publisher" else (e.certification.verifier if e.certification else None)
        if key is None:
            return self.result(False, "no certification")
        ok = key.keyid in self.allowed or (key.name is not None and key.name in self.allowed)
        return self.result(ok, f"{self.whose} {_key_label(key)} {'is' if ok else 'is not'} in {self.allowed}")


def _predicate_rule(name: str, check: Callable[[dict[str, Any]], tuple[bool, str]]) -> Rule:
    class PredicateRule(Rule):
        def verify(self, e: Evidence) -> RuleResult:
            if e.certification is None:
                return self.result(False, "no certification")
            return self.result(*check(e.certification.predicate))

    rule = PredicateRule()
    rule.name = name
    return rule


@dataclass
class MaxAge(Rule):
    limit: timedelta
    text: str
    name: str = "max_age"

    def verify(self, e: Evidence) -> RuleResult:
        if e.certification is None:
            return self.result(False, "no certification")
        age = e.now - e.certification.certified_at
        if age.total_seconds() < 0:
            return self.result(
                False, f"certified at {e.certification.certified_at.isoformat()}, after the time the gate judges"
            )
        return self.result(
            age <= self.limit, f"certified {age.total_seconds() / 86400:.1f} days ago (limit {self.text})"
        )


class NoRevokedKeys(Rule):
    name = "no_revoked_keys"

    def verify(self, e: Evidence) -> RuleResult:
        revoked = [k for k in (e.signer, e.certification.verifier if e.certification else None) if k and k.revoked]
        revoked += [k for k in e.revoked_verifiers if k not in revoked]
        if revoked:
            return self.result(
                False,
                "revoked: " + ", ".join(_key_label(k) for k in revoked) + " (a revoked key's signatures never count)",
            )
        return self.result(True, "signer and verifier keys are not revoked")


@dataclass
class AllOf:
    rules: Sequence[Rule]

    def verify(self, evidence: Evidence) -> list[RuleResult]:
        return [rule.verify(evidence) for rule in self.rules]


def _typed(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise InputError(f"policy rule {key} must be {what}, got {type(value).__name__} {value!r}")
    return value


def _device(value: str) -> Rule:
    if value not in ("cpu", "cuda", "any"):
        raise InputError(f"policy rule device must be cpu, cuda or any, got {value!r}")
    return _predicate_rule(
        "device",
        lambda p: (
            value == "any" or str(p.get("device", "")).split(":")[0] == value,
            f"certified on {p.get('device')} (required: {value})",
        ),
    )


def _bitwise(required: bool) -> Rule:
    def check(p: dict[str, Any]) -> tuple[bool, str]:
        b = p.get("bitwise") or {}
        ok = all(b.get(k) is True for k in ("identity", "state", "outputs"))
        return (ok or not required), f"identity {b.get('identity')}, state {b.get('state')}, outputs {b.get('outputs')}"

    return _predicate_rule("bitwise", check)


def _probe_set(value: str) -> Rule:
    def check(p: dict[str, Any]) -> tuple[bool, str]:
        probes = p.get("probes") or {}
        name, digest = probes.get("name"), probes.get("digest")
        ok = value in (name, digest, f"{name}@{digest}")
        return ok, f"probe set {name} {digest}"

    return _predicate_rule("probe_set", check)


def _min_cycles(n: int) -> Rule:
    if n < 1:
        raise InputError(f"policy rule min_cycles must be at least 1, got {n}")

    def check(p: dict[str, Any]) -> tuple[bool, str]:
        cycles = p.get("cycles")
        ok = isinstance(cycles, int) and not isinstance(cycles, bool) and cycles >= n
        return ok, f"{cycles} cycles (minimum {n})"

    return _predicate_rule("min_cycles", check)


def _min_effect(x: float) -> Rule:
    if not 0 <= x < float("inf"):
        raise InputError(f"policy rule min_effect must be a finite number of at least 0, got {x}")

    def check(p: dict[str, Any]) -> tuple[bool, str]:
        name, effect = metric(p.get("metrics") or {}, "adapted")
        return effect is not None and effect >= x, f"{name} while attached {effect} (minimum {x:g})"

    return _predicate_rule("min_effect", check)


def _max_age(text: str) -> Rule:
    limit = parse_duration(text, "policy rule max_age")
    if limit.total_seconds() <= 0:
        raise InputError(f"policy rule max_age must be a positive duration, got {text!r}")
    return MaxAge(limit, text)


RULES: dict[str, tuple[type | tuple[type, ...], str, Callable[[Any], Rule | None]]] = {
    "publishers": (list, "a list of key names or ids", lambda v: KeyList(v, "publisher")),
    "verifiers": (list, "a list of key names or ids", lambda v: KeyList(v, "verifier")),
    "device": (str, "a string", _device),
    "min_cycles": (int, "an integer", _min_cycles),
    "bitwise": (bool, "true or false", lambda v: _bitwise(v) if v else None),
    "min_effect": ((int, float), "a number", lambda v: _min_effect(float(v))),
    "probe_set": (str, "a string", _probe_set),
    "max_age": (str, "a duration string", _max_age),
    "no_revoked_keys": (bool, "true or false", lambda v: None if v else _revoked_keys_always_count()),
}


def _revoked_keys_always_count() -> Rule:
    raise InputError("policy rule no_revoked_keys = false is not allowed: revoked keys never count; remove the rule")


def parse_policy(text: str, where: str) -> AllOf:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{where} is not valid TOML: {exc}") from exc
    if set(doc) != {"policy"} or not isinstance(doc["policy"], dict):
        raise InputError(f"{where}: expected exactly one [policy] table, found {sorted(doc) or 'nothing'}")
    rules: list[Rule] = [Certified()]
    for key, value in doc["policy"].items():
        if key not in RULES:
            raise InputError(f"{where}: unknown rule {key!r} (known: {', '.join(RULES)})")
        kind, what, build = RULES[key]
        _typed(key, value, kind, what)
        if kind is list and not all(isinstance(v, str) for v in value):
            raise InputError(f"policy rule {key} must be {what}")
        rule = build(value)
        if rule is not None:
            rules.append(rule)
    return AllOf([*rules, NoRevokedKeys()])


def _decode(data: bytes, where: str) -> str:
    """Policy files as editors write them: UTF-8, with or without a BOM, or UTF-16 with one
    (PowerShell's `>`). Anything else is refused with one line, never guessed."""
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(bom):
            data, encoding = data[len(bom) :], codec
            break
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where} is not valid {encoding.upper()} (byte {exc.start}): save the policy as UTF-8"
        ) from exc


def load_policy(path: Path) -> AllOf:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read policy {path}: {exc.strerror}") from exc
    return parse_policy(_decode(data, str(path)), str(path))
