"""Which registry implementation serves a location, decided in one table.

A location is `--registry`, else $REVREG_REGISTRY, else ./.revreg; read here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from revreg.errors import InputError

if TYPE_CHECKING:
    from revreg.registry.api import RegistryAPI
    from revreg.registry.service import Registry

ENV = "REVREG_REGISTRY"
DEFAULT_LOCATION = ".revreg"


def location_of(given: str | None) -> str:
    return given or os.environ.get(ENV) or DEFAULT_LOCATION


def _remote(location: str, actor: str | None) -> RegistryAPI:
    from revreg.registry.remote import RemoteRegistry

    return RemoteRegistry(location)


def _sql(location: str, actor: str | None) -> RegistryAPI:
    from revreg.registry.service import Registry

    return Registry.open(location, actor)


@dataclass(frozen=True)
class Kind:
    name: str
    matches: Callable[[str], bool]
    opener: Callable[[str, str | None], RegistryAPI]
    local: bool  # the registry's database is reachable from this process


KINDS: tuple[Kind, ...] = (
    Kind("http", lambda loc: loc.startswith(("http://", "https://")), _remote, local=False),
    Kind("database", lambda loc: loc.startswith(("postgresql", "sqlite")) and "://" in loc, _sql, local=True),
    Kind("directory", lambda loc: "://" not in loc, _sql, local=True),
)


def kind_of(location: str | None) -> Kind:
    loc = location_of(location)
    for kind in KINDS:
        if kind.matches(loc):
            return kind
    raise InputError(
        f"unsupported registry location {loc!r}: use a directory, postgresql+psycopg://… or http(s)://HOST:PORT"
    )


def open_registry(location: str | None = None, actor: str | None = None) -> RegistryAPI:
    """The registry at `location` (a directory, a database URL or an http(s):// URL)."""
    return kind_of(location).opener(location_of(location), actor)


def open_local(location: str | None, command: str, actor: str | None = None) -> Registry:
    """The SQL registry, for commands that work on the database itself (init, serve, tokens…);
    an http(s):// location is refused with one line."""
    from revreg.registry.api import Unsupported
    from revreg.registry.service import Registry

    if not kind_of(location).local:
        raise Unsupported(f"`revreg {command}` works on the registry's database directly: run it on the server")
    return Registry.open(location_of(location), actor)


def require_local(location: str | None, command: str) -> str:
    from revreg.registry.api import Unsupported

    if not kind_of(location).local:
        raise Unsupported(f"`revreg {command}` works on the registry's database directly: run it on the server")
    return location_of(location)
