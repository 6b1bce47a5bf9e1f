"""Option bundles shared by several commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # cryptography loads only for commands that touch keys (`revreg ls` does not)
    from revreg.artifacts.keys import Keyring, Signer

PASSPHRASE_ENV = "REVREG_KEY_PASSPHRASE"  # revreg.artifacts.keys.PASSPHRASE_ENV; a test keeps them equal

F = Callable[..., Any]


class ModelPath(click.ParamType):
    """A model: a path, a Hugging Face cache repo folder, or org/name[@revision] from the local
    Hugging Face cache (never downloaded)."""

    name = "MODEL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            return value
        from revreg.artifacts.hfcache import resolve_model
        from revreg.errors import InputError

        try:
            return resolve_model(str(value))
        except InputError as exc:
            self.fail(str(exc), param, ctx)


MODEL = ModelPath()


def keys_dir_option(f: F) -> F:
    return click.option(
        "--keys-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="REVREG_KEYS",
        default=None,
        help="Keyring directory (default: $REVREG_KEYS, else ~/.config/revreg/keys).",
    )(f)


def passphrase_env_option(f: F) -> F:
    return click.option(
        "--passphrase-env",
        metavar="VAR",
        default=None,
        help=f"Environment variable holding the key passphrase (default: {PASSPHRASE_ENV} when set).",
    )(f)


def _json_silences_progress(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from revreg.progress import silence

        silence()
    return value


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, callback=_json_silences_progress, help="Print JSON instead of text."
    )(f)


def registry_option(f: F) -> F:
    return click.option(
        "--registry",
        default=None,
        metavar="DIR|URL",
        help="Registry: a directory, a database URL (postgresql+psycopg://…) or http(s)://HOST:PORT "
        "(default: $REVREG_REGISTRY, else ./.revreg).",
    )(f)


def keyring(keys_dir: Path | None) -> Keyring:
    from revreg.artifacts.keys import Keyring

    return Keyring(keys_dir)


def signer(keys_dir: Path | None, key_name: str, passphrase_env: str | None) -> Signer:
    """A keyring key ready to sign; its passphrase from $VAR (--passphrase-env), else
    $REVREG_KEY_PASSPHRASE when set."""
    env = passphrase_env or (PASSPHRASE_ENV if os.environ.get(PASSPHRASE_ENV) else None)
    from revreg.artifacts.keys import passphrase_from_env

    return keyring(keys_dir).signer(key_name, passphrase_from_env(env))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def shown(value: object) -> str:
    """Text from an artifact or a registry as a terminal may show it: every character that is
    not printable (escape sequences, newlines, bidirectional controls) as its escape, so a
    signed description cannot draw over the lines a reviewer reads."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
