"""Registry commands: init, db, push, pull, ls, show, tag, publish, yank, base, audit, fsck."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from revreg.cli.ls_cmd import _short, ls  # noqa: F401 - ls is registered from here too
from revreg.cli.main import skip_teardown
from revreg.cli.options import (
    MODEL,
    human_bytes,
    json_option,
    keyring,
    keys_dir_option,
    passphrase_env_option,
    registry_option,
    shown,
)
from revreg.cli.options import signer as make_signer
from revreg.errors import CheckFailed, InputError
from revreg.registry.api import to_json
from revreg.registry.locate import open_registry, require_local

if TYPE_CHECKING:
    from collections.abc import Callable

    from revreg.registry.api import PushResult, RegistryAPI


def _embedded_db(registry: str | None) -> tuple[str, Path | None]:
    """The location, and its database file when it is an embedded registry that push and pull
    serve through registry.embedded (None for a server database or an http(s) registry)."""
    from revreg.registry.locate import location_of
    from revreg.registry.reader import sqlite_file

    location = location_of(registry)
    return location, sqlite_file(location)


def _open(registry: str | None) -> RegistryAPI:
    """The registry at --registry, whichever implementation serves it (see registry.locate)."""
    return open_registry(registry)


@click.command()
@registry_option
@click.option(
    "--store",
    default=None,
    metavar="DIR",
    help="Blob store directory (default: DIR/blobs for an embedded registry; required for a database URL).",
)
def init(registry: str | None, store: str | None) -> None:
    """Create a registry (or bring an existing one to the current schema)."""
    from revreg.registry.service import Registry

    reg = Registry.init(require_local(registry, "init"), store)
    click.echo(f"registry ready at {reg.location.describe()} (blobs in {reg.store.describe()})")


@click.group()
def db() -> None:
    """Show or upgrade the registry database schema."""


@db.command()
@registry_option
def upgrade(registry: str | None) -> None:
    """Upgrade the registry database to this revreg's schema."""
    from revreg.registry import db as regdb

    loc = regdb.resolve(require_local(registry, "db upgrade"))
    engine = regdb.make_engine(loc)
    before = regdb.check_upgradable(engine)  # before the engine connects (and changes an SQLite file)
    regdb.migrate(engine)
    click.echo(f"schema {before or 'empty'} -> {regdb.current_revision(engine)} at {loc.describe()}")


@db.command()
@registry_option
def current(registry: str | None) -> None:
    """Print the schema revision of the registry database (and the one this revreg needs)."""
    from revreg.registry import db as regdb

    loc = regdb.resolve(require_local(registry, "db current"))
    revision = regdb.current_revision(regdb.make_engine(loc))
    click.echo(f"{revision or 'empty'} (this revreg needs {regdb.HEAD})")
    if revision != regdb.HEAD:
        raise CheckFailed(f"schema at {loc.describe()} is not current: run `revreg db upgrade`")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@json_option
@registry_option
def push(files: tuple[Path, ...], as_json: bool, registry: str | None) -> None:
    """Store signed artifacts in the registry.

    The signature must be by a trusted publisher key (`revreg keys trust --role publisher`),
    and every tensor must match the signed manifest. Pushing the same bytes again does nothing;
    different bytes under an existing NAME:VERSION is refused.
    """
    from contextlib import ExitStack

    with ExitStack() as stack:
        location, db_file = _embedded_db(registry)
        if db_file is not None:
            # An embedded registry: the file streams into the store while SQLAlchemy loads for
            # the transaction that records it (registry.embedded).
            from revreg.registry.embedded import Embedded

            pusher = stack.enter_context(Embedded(location, db_file)).push
        else:
            pusher = _open(registry).push
        _push_each(files, pusher, as_json)
    if db_file is not None:
        skip_teardown()


def _push_each(files: tuple[Path, ...], pusher: Callable[[Path], PushResult], as_json: bool) -> None:
    results: list[PushResult] = []
    try:
        for path in files:
            result = pusher(path)
            results.append(result)
            if not as_json:
                verb = "pushed" if result.created else "already present:"
                click.echo(f"{verb} {result.version.ref} {result.version.digest} ({result.version.state})")
    finally:
        if as_json:  # what was stored before a later file failed, so a script knows
            click.echo(json.dumps(to_json(results), indent=1))


@click.command()
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    required=True,
    help="File (safetensors) or directory (peft) to create.",
)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "peft"]), default="safetensors", show_default=True)
@click.option("--allow-unpublished", is_flag=True, help="Also pull versions that are pending, certified or rejected.")
@click.option("--allow-yanked", is_flag=True, help="Also pull a yanked version (recorded in the audit log).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@json_option
@registry_option
def pull(
    ref: str,
    output: str,
    fmt: str,
    allow_unpublished: bool,
    allow_yanked: bool,
    force: bool,
    as_json: bool,
    registry: str | None,
) -> None:
    """Fetch REF (NAME, NAME:VERSION, NAME:TAG or NAME@sha256:...) after re-checking it.

    The digest, signature and (for published versions) certification are checked before
    anything is written to the output, which appears complete or not at all. --force replaces
    the file or link at OUTPUT (never the file a link points to).
    """
    if output == "-":
        # Standard output cannot take bytes back: a pull shows nothing until every check passed.
        raise InputError("pull -o - is not supported: a pull writes a file that appears only once checked; name one")
    if output.endswith(("/", os.sep)) and (Path(output.rstrip("/" + os.sep)).is_symlink() or not Path(output).is_dir()):
        raise InputError(
            f"{output} names a directory, and there is none: name the file (or the peft directory) to create"
        )
    dest = Path(output)
    if (dest.exists() or dest.is_symlink()) and not (force and (dest.is_file() or dest.is_symlink())):
        what = "a directory" if dest.is_dir() else "a file"
        hint = "" if dest.is_dir() else " (pass --force to replace it)"
        raise InputError(f"{dest} already exists and is {what}; nothing was written{hint}")
    location, db_file = _embedded_db(registry)
    if db_file is not None:
        # An embedded registry: the blob streams out while SQLAlchemy loads for the checks that
        # decide whether it may be delivered (registry.embedded).
        from revreg.registry.embedded import Embedded

        with Embedded(location, db_file) as embedded:
            info = embedded.pull(ref, dest, fmt, allow_unpublished, allow_yanked)
        skip_teardown()
    else:
        info = _open(registry).pull(ref, dest, fmt, allow_unpublished, allow_yanked)
    if as_json:
        click.echo(json.dumps({"version": to_json(info), "output": str(dest), "format": fmt}, indent=1))
        return
    click.echo(f"pulled {info.ref} {info.digest} ({info.state}) -> {dest}")


@click.command()
@click.argument("ref")
@json_option
@registry_option
def show(ref: str, as_json: bool, registry: str | None) -> None:
    """Show one version: manifest, state, signer, certifications and history."""
    detail = _open(registry).show(ref)
    v = detail.info
    if as_json:
        click.echo(json.dumps(to_json(detail), indent=1))
        return
    rows = [
        ("behavior", v.ref),
        ("state", v.state + (f" ({v.yank_reason})" if v.yank_reason else "")),
        ("digest", v.digest),
        ("size", human_bytes(v.size)),
        ("base", v.base_identity + ("" if detail.base_registered else " (not registered)")),
        ("signer", f"{v.signer_name or '?'} {v.signer_keyid}" + (" REVOKED" if v.signer_revoked else "")),
        ("pushed", f"{v.pushed_at.isoformat()} by {v.pushed_by}"),
        ("tags", ", ".join(v.tags) or "-"),
        ("description", detail.manifest.get("description") or "-"),
    ]
    for label, value in rows:
        click.echo(f"{label:<12} {shown(value)}")
    click.echo("attachments")
    for a in detail.manifest["attachments"]:
        click.echo(f"  {a['kind']:<6} {shown(a['target'])}")
    click.echo("certifications" + ("" if detail.certifications else "  none"))
    for c in detail.certifications:
        click.echo(f"  {'PASS' if c.passed else 'FAIL'}  {c.verifier_keyid}  {c.created_at.isoformat()}")
    click.echo("history")
    for e in detail.history:
        click.echo(f"  #{e.seq} {e.at} {e.action} by {shown(e.actor)}")


@click.command()
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON lines here (e.g. NAME.intoto.jsonl) instead of standard output.",
)
@registry_option
def attestations(ref: str, output: Path | None, registry: str | None) -> None:
    """Export REF's certifications as DSSE envelopes, one JSON line each, oldest first.

    Each line is the envelope exactly as the verifier signed it: an in-toto Statement v1 about
    the artifact's sha256 digest, with revreg's predicate, signed with Ed25519. The key id is
    revreg's (`sha256:` of the public key's DER); `revreg keys export` gives the public key. Any
    DSSE verifier (securesystemslib, in-toto tooling, cosign's DSSE support) checks them.
    """
    from revreg.artifacts.safetensors_io import atomic_output

    detail = _open(registry).show(ref)
    lines = "".join(c.envelope + "\n" for c in detail.certifications)
    if output is None:
        click.echo(lines, nl=False)
        return
    with atomic_output(output) as fh:
        fh.write(lines.encode("utf-8"))
    click.echo(f"wrote {len(detail.certifications)} certifications of {detail.info.ref} to {output}", err=True)


@click.command()
@click.argument("ref")
@click.argument("tag_name", metavar="TAG")
@click.option("--allow-downgrade", is_flag=True, help="Allow moving the tag to an older version (audited).")
@json_option
@registry_option
def tag(ref: str, tag_name: str, allow_downgrade: bool, as_json: bool, registry: str | None) -> None:
    """Point TAG (e.g. latest, stable) of a behavior at REF; refuses downgrades unless allowed."""
    info = _open(registry).tag(ref, tag_name, allow_downgrade)
    _done(info, as_json, f"{info.name}:{tag_name} -> {info.version}")


def _done(info: Any, as_json: bool, line: str) -> None:
    """The changed entity in its one JSON shape, or one line for a person."""
    click.echo(json.dumps(to_json(info), indent=1) if as_json else shown(line))


@click.command()
@click.argument("ref")
@json_option
@registry_option
def publish(ref: str, as_json: bool, registry: str | None) -> None:
    """Publish a certified version (its newest certification by a trusted verifier key says PASS)."""
    info = _open(registry).publish(ref)
    _done(info, as_json, f"published {info.ref} {info.digest}")


@click.command()
@click.argument("ref")
@click.option("--reason", required=True, help="Why the version is withdrawn (recorded in the audit log).")
@json_option
@registry_option
def yank(ref: str, reason: str, as_json: bool, registry: str | None) -> None:
    """Withdraw a version: it stays recorded but is no longer pulled."""
    info = _open(registry).yank(ref, reason)
    _done(info, as_json, f"yanked {info.ref}: {reason}")


@click.group()
def base() -> None:
    """Register and list base models."""


@base.command("register")
@click.argument("path", type=MODEL)
@click.option("--name", default=None, help="A human name for the base (e.g. gpt2-small).")
@json_option
@registry_option
def base_register(path: Path, name: str | None, as_json: bool, registry: str | None) -> None:
    """Record a base model's identity and per-tensor manifest in the registry."""
    info, created = _open(registry).register_base(path, name)
    if as_json:
        click.echo(json.dumps({"base": to_json(info), "created": created}, indent=1))
        return
    click.echo(
        f"{'registered' if created else 'already registered:'} {info.identity} ({info.tensor_count} tensors, "
        f"{human_bytes(info.total_bytes)})"
    )


@base.command("list")
@json_option
@registry_option
def base_list(as_json: bool, registry: str | None) -> None:
    """List registered base models with their identities and sizes."""
    bases = _open(registry).bases()
    if as_json:
        click.echo(json.dumps(to_json(bases), indent=1))
        return
    for b in bases:
        click.echo(f"{b.identity}  {b.name or '-'}  {b.tensor_count} tensors  {human_bytes(b.total_bytes)}")


@click.group()
def audit() -> None:
    """Read and verify the registry's hash-chained audit log."""


def _public_key(key: str, keys_dir: Path | None) -> dict[str, Any]:
    """A keyring name or a PEM public key file, as trust anchors by key id."""
    from revreg.artifacts.keys import TrustedKey, keyid_of, load_public_pem

    path = Path(key)
    if path.is_file():
        public = load_public_pem(path.read_bytes(), path.name)
        return {keyid_of(public): TrustedKey(path.stem, keyid_of(public), public)}
    return {k.keyid: k for k in keyring(keys_dir).trusted().values() if k.name == key} or _no_key(key)


def _no_key(key: str) -> dict[str, Any]:
    raise InputError(f"no key {key!r}: give a keyring name or a PEM public key file")


@audit.command("verify")
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A signed checkpoint (from `revreg audit checkpoint`) the log must still match (repeatable).",
)
@click.option(
    "--checkpoint-key",
    default=None,
    metavar="NAME|PEM",
    help="The key that signs checkpoints: a keyring name or a PEM public key file.",
)
@registry_option
@keys_dir_option
def audit_verify(
    checkpoints: tuple[Path, ...], checkpoint_key: str | None, registry: str | None, keys_dir: Path | None
) -> None:
    """Check the audit chain; exit 1 naming the first edited, deleted or reordered row.

    The chain alone cannot see a rewrite that recomputes every hash (anyone who can write the
    database can do that). With --checkpoint it also checks that the log still holds the head a
    key outside the database signed: any rewrite of the rows a checkpoint covers is detected.
    """
    from revreg.registry.checkpoint import check_against, read_checkpoint

    if checkpoints and checkpoint_key is None:
        raise InputError("--checkpoint needs --checkpoint-key (the key that signed it)")
    reg = _open(registry)
    verdict = reg.audit_verify()
    if not verdict.ok:
        raise CheckFailed(f"audit log broken: {verdict.problem}")
    if checkpoints:
        assert checkpoint_key is not None
        from revreg.registry.chain import recompute

        trusted = _public_key(checkpoint_key, keys_dir)
        entries = reg.audit_log()
        # Recomputed here from the rows themselves: a server's own verdict is not taken on trust.
        broken = recompute(entries)
        if broken is not None:
            raise CheckFailed(f"audit log broken: {broken}")
        for path in checkpoints:
            try:
                text = path.read_bytes()
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror}") from exc
            point = read_checkpoint(text.rstrip(b"\n"), trusted)  # one envelope per file, newline-terminated
            check_against(point, entries)
            click.echo(f"checkpoint {path.name}: rows 1..{point.length} as signed at {point.time}")
    click.echo(f"audit log OK: {verdict.rows} rows, chain intact")


@audit.command("checkpoint")
@click.option("--key", "key_name", required=True, help="The key that signs the checkpoint (keyring name).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Checkpoint file to write; keep it outside the registry (CI artifacts, git, a ticket).",
)
@passphrase_env_option
@registry_option
@keys_dir_option
def audit_checkpoint(
    key_name: str, output: Path, passphrase_env: str | None, registry: str | None, keys_dir: Path | None
) -> None:
    """Sign the audit log's current head (length, head hash, time) with a key outside the database.

    `revreg audit verify --checkpoint FILE --checkpoint-key KEY` later detects any rewrite of
    the rows it covers, even one that recomputes the whole chain.
    """

    from revreg.artifacts.artifact import utc_timestamp
    from revreg.artifacts.safetensors_io import atomic_output
    from revreg.registry.checkpoint import make_checkpoint

    signer = make_signer(keys_dir, key_name, passphrase_env)
    reg = _open(registry)
    verdict = reg.audit_verify()
    if not verdict.ok:
        raise CheckFailed(f"audit log broken: {verdict.problem}; not signing a broken chain")
    envelope = make_checkpoint(reg.audit_log(), reg.describe(), utc_timestamp(), signer)
    with atomic_output(output) as fh:
        fh.write(envelope + b"\n")
    click.echo(f"checkpoint of {verdict.rows} rows signed by {signer.name} -> {output}")


@audit.command("log")
@click.option("--subject", default=None, help="Only rows about this subject (e.g. NAME:VERSION).")
@json_option
@registry_option
def audit_log(subject: str | None, as_json: bool, registry: str | None) -> None:
    """Print the audit log, oldest first (optionally only the rows about one subject)."""
    entries = _open(registry).audit_log(subject)
    if as_json:
        click.echo(json.dumps(to_json(entries), indent=1))
        return
    for e in entries:
        click.echo(shown(f"#{e.seq} {e.at} {e.actor} {e.action} {e.subject} {json.dumps(e.details, sort_keys=True)}"))


@click.command()
@click.option(
    "--prune",
    is_flag=True,
    help="Delete orphan blobs and staging files left by interrupted writes (only those older than --grace "
    "that no live writer holds).",
)
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="With --prune: how old an orphan must be before it counts as abandoned.",
)
@json_option
@registry_option
def fsck(prune: bool, grace: str, as_json: bool, registry: str | None) -> None:
    """Check every blob against its digest and every row against its blob (exit 1 on problems).

    Safe beside running pushes: --prune never deletes a file a live push still holds, nor one
    younger than --grace, and re-checks the rows right before each deletion.
    """
    from revreg.durations import parse_duration

    report = _open(registry).fsck(prune, parse_duration(grace, "--grace").total_seconds())
    if as_json:
        click.echo(json.dumps(to_json(report), indent=1))
    else:
        # A problem can quote a stored header: a hostile one must not add or redraw lines.
        for w in report.warnings:
            click.echo(f"warning: {shown(w)}")
        for p in report.problems:
            click.echo(f"PROBLEM: {shown(p)}")
        click.echo(
            f"checked {report.blobs_checked} blobs and {report.versions_checked} versions: "
            f"{len(report.problems)} problems, {len(report.warnings)} warnings"
        )
    if report.problems:
        raise CheckFailed(f"fsck found {len(report.problems)} problems: {report.problems[0]}")


@click.command("trust")
@click.argument("key")
@click.option("--role", type=click.Choice(["publisher", "verifier"]), required=True)
@click.option("--name", default=None, help="Name to record (default: the keyring name, or the PEM file's stem).")
@json_option
@registry_option
@keys_dir_option
def keys_trust(
    key: str, role: str, name: str | None, as_json: bool, registry: str | None, keys_dir: Path | None
) -> None:
    """Trust KEY (a keyring name or a PEM public key file) in the registry for ROLE."""
    path = Path(key)
    if path.is_file():
        pem, default_name = path.read_bytes(), path.stem
        from revreg.artifacts.keys import load_public_pem

        load_public_pem(pem, str(path))  # a file that is not a PEM key is named as the file
    else:
        pem, default_name = keyring(keys_dir).public_pem(key), key
    record = _open(registry).trust_key(pem, name or default_name, role)
    _done(record, as_json, f"trusted {record.name} {record.keyid} as {record.role}")


@click.command("revoke")
@click.argument("key")
@click.option("--reason", required=True, help="Why the key is revoked (recorded in the audit log).")
@json_option
@registry_option
def keys_revoke(key: str, reason: str, as_json: bool, registry: str | None) -> None:
    """Revoke KEY (key id or name) in the registry, in every role; its artifacts are refused."""
    records = _open(registry).revoke_key(key, reason)
    if as_json:
        click.echo(json.dumps(to_json(records), indent=1))
        return
    for record in records:
        click.echo(f"revoked {record.name} {record.keyid} ({record.role})")


@click.command("trusted")
@json_option
@registry_option
def keys_trusted(as_json: bool, registry: str | None) -> None:
    """List the keys the registry knows, their roles, and revocations."""
    records = _open(registry).key_records()
    if as_json:
        click.echo(json.dumps(to_json(records), indent=1))
        return
    for r in records:
        state = f"REVOKED: {r.revoked_reason}" if r.revoked else "trusted"
        click.echo(f"{r.name:<20} {r.role:<10} {r.keyid}  {state}")


@audit.command("report")
@click.option("--behavior", default=None, help="Only this behavior (default: the whole registry).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Report file: .html (self-contained), .md or .json.",
)
@click.option(
    "--generated-at",
    default=None,
    metavar="ISO8601",
    help="Pin the generation time (the same registry state then gives the same bytes).",
)
@registry_option
def audit_report(behavior: str | None, output: Path, generated_at: str | None, registry: str | None) -> None:
    """Write an audit report: versions, lifecycles, certifications with RF and divergence
    charts, keys and revocations, and the audit-log chain verdict (exit 1 if it is broken)."""
    from datetime import UTC, datetime

    from revreg.artifacts.safetensors_io import atomic_output
    from revreg.audit.collect import collect
    from revreg.audit.render import render

    formats = {".html": "html", ".htm": "html", ".md": "md", ".json": "json"}
    fmt = formats.get(output.suffix.lower())
    if fmt is None:
        raise InputError(f"{output}: the report format follows the extension: .html, .md or .json")
    when = generated_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report = collect(_open(registry), behavior, when)
    with atomic_output(output) as fh:
        fh.write(render(report, fmt).encode("utf-8"))
    chain = report["audit_chain"]
    click.echo(
        f"wrote {output}: {report['summary']['versions']} versions, audit log {'intact' if chain['ok'] else 'BROKEN'}"
    )
    if not chain["ok"]:
        raise CheckFailed(f"audit log broken: {chain['problem']} (the report says so)")
