"""`revreg keys`: generate, list, import and export signing keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from revreg.artifacts.keys import passphrase_from_env
from revreg.cli.options import json_option, keyring, keys_dir_option


@click.group()
def keys() -> None:
    """Manage Ed25519 signing keys (private keys stay in the keyring directory)."""


@keys.command()
@click.argument("name")
@click.option(
    "--passphrase-env",
    metavar="VAR",
    default=None,
    help="Encrypt the private key with the passphrase in environment variable VAR.",
)
@keys_dir_option
def generate(name: str, passphrase_env: str | None, keys_dir: Path | None) -> None:
    """Create a new Ed25519 key pair NAME."""
    info = keyring(keys_dir).generate(name, passphrase_from_env(passphrase_env))
    state = "encrypted" if info.encrypted else "unencrypted"
    click.echo(f"created key {info.name} {info.keyid} ({state}) in {keyring(keys_dir).directory}")


@keys.command("list")
@json_option
@keys_dir_option
def list_keys(as_json: bool, keys_dir: Path | None) -> None:
    """List the keys in the keyring."""
    infos = keyring(keys_dir).list()
    if as_json:
        click.echo(json.dumps([info.__dict__ for info in infos], indent=2))
        return
    if not infos:
        click.echo(f"no keys in {keyring(keys_dir).directory}")
    for info in infos:
        kind = ("private, encrypted" if info.encrypted else "private") if info.has_private else "public only"
        click.echo(f"{info.name:<20} {info.keyid}  {kind}")


@keys.command("import")
@click.argument("name")
@click.argument("public_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@keys_dir_option
def import_key(name: str, public_key: Path, keys_dir: Path | None) -> None:
    """Trust the PEM PUBLIC_KEY of another signer under NAME."""
    info = keyring(keys_dir).import_public(name, public_key)
    click.echo(f"imported key {info.name} {info.keyid}")


@keys.command("export")
@click.argument("name")
@keys_dir_option
def export_key(name: str, keys_dir: Path | None) -> None:
    """Print the PEM public key of NAME (to give to verifiers)."""
    click.echo(keyring(keys_dir).public_pem(name).decode().rstrip(os.linesep))
