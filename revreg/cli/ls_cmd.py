"""`revreg ls`: the listing, kept in a module of its own so it imports only what it uses
(click, the driver-level reader for an embedded registry; docs/performance.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from revreg.cli.options import human_bytes, json_option, registry_option


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


@click.command("ls")
@click.argument("name", required=False)
@json_option
@registry_option
def ls(name: str | None, as_json: bool, registry: str | None) -> None:
    """List behavior versions (all, or those of NAME)."""
    from revreg.registry.locate import location_of
    from revreg.registry.reader import ls_sqlite, sqlite_file

    # An embedded registry is listed through sqlite3 alone (registry.reader): no SQLAlchemy.
    location = location_of(registry)
    db_file = sqlite_file(location)
    if db_file is not None:
        versions = ls_sqlite(db_file, str(db_file.parent) if "://" not in location else str(db_file), name)
    else:
        from revreg.registry.locate import open_registry

        versions = open_registry(registry).ls(name)
    if as_json:
        from revreg.registry.api import to_json

        click.echo(json.dumps(to_json(versions), indent=1))
        return
    if not versions:
        click.echo("no behaviors")
        return
    rows = [("VERSION", "STATE", "DIGEST", "SIZE", "SIGNER", "PUSHED", "TAGS")]
    for v in versions:
        signer = (v.signer_name or _short(v.signer_keyid)) + (" (REVOKED)" if v.signer_revoked else "")
        rows.append(
            (
                v.ref,
                v.state,
                _short(v.digest),
                human_bytes(v.size),
                signer,
                v.pushed_at.isoformat(" ", "minutes")[:16],  # YYYY-MM-DD HH:MM
                ",".join(v.tags),
            )
        )
    click.echo(_table(rows))


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns two spaces apart, trailing spaces trimmed."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*r).rstrip() for r in rows])
