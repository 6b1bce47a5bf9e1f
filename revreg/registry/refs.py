"""References to versions: NAME, NAME:VERSION, NAME:TAG, NAME@sha256:<hex>."""

from __future__ import annotations

from dataclasses import dataclass

from revreg.artifacts.artifact import VERSION_RE, check_name
from revreg.errors import InputError
from revreg.registry.store import check_digest


@dataclass(frozen=True)
class Ref:
    name: str
    selector: str | None = None  # a version or a tag
    digest: str | None = None

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.selector}" if self.selector else self.name


def parse_ref(text: str) -> Ref:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"reference {text!r} contains control characters")
    if "@" in text:
        name, _, digest = text.partition("@")
        return Ref(check_name(name), digest=check_digest(digest))
    name, sep, selector = text.partition(":")
    if sep and not VERSION_RE.fullmatch(selector):
        raise InputError(f"invalid version or tag {selector!r} in {text!r}")
    return Ref(check_name(name), selector or None)
