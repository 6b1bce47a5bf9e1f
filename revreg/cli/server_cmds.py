"""`revreg serve` and `revreg tokens`: the HTTP registry and its bearer tokens."""

from __future__ import annotations

import json
import re

import click

from revreg.cli.options import json_option
from revreg.cli.registry_cmds import registry_option
from revreg.errors import InputError


def _size(text: str) -> int:
    m = re.match(r"^(\d+)\s*([KMGT]?)i?B?$", text.strip(), re.IGNORECASE)
    if not m:
        raise InputError(f"--max-upload {text!r}: use a size like 512MiB or 64GiB")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8470, show_default=True, help="TCP port.")
@click.option("--anonymous-read", is_flag=True, help="Let requests without a token read (off by default).")
@click.option("--max-upload", default="64GiB", show_default=True, help="Largest artifact or probe set accepted.")
@click.option("--openapi", "print_openapi", is_flag=True, help="Print the OpenAPI document and exit.")
@registry_option
def serve(
    host: str, port: int, anonymous_read: bool, max_upload: str, print_openapi: bool, registry: str | None
) -> None:
    """Serve a registry (SQLite or PostgreSQL) over HTTP for teams and CI runners.

    Clients use `--registry http(s)://HOST:PORT` with a bearer token in $REVREG_TOKEN. The
    server enforces the lifecycle, trust policy and audit log itself; uploads stream and are
    checked before anything becomes visible; downloads support Range requests.
    """
    from revreg.registry.locate import open_local
    from revreg.server.app import asgi, create_app

    reg = open_local(registry, "serve")
    if print_openapi:
        click.echo(json.dumps(create_app(reg, anonymous_read).openapi(), indent=1, sort_keys=True))
        return
    import socket

    import uvicorn

    from revreg.allocator import keep_freed_memory

    keep_freed_memory()  # every upload's chunks reuse the same pages (revreg/allocator.py)

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror} (pick another --port)") from exc
    click.echo(
        f"serving {reg.location.describe()} on http://{host}:{port} "
        f"(anonymous read {'on' if anonymous_read else 'off'})",
        err=True,
    )
    uvicorn.run(
        asgi(reg, anonymous_read, _size(max_upload)),
        host=host,
        port=port,
        log_level="warning",
        h11_max_incomplete_event_size=16 * 1024,
        timeout_keep_alive=30,
    )


@click.group()
def tokens() -> None:
    """Create, list and revoke API tokens for `revreg serve` (on the server's registry)."""


@tokens.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    metavar="ACTION:NAMESPACE",
    help="read, push, certify, publish or admin, on a namespace or * (repeatable).",
)
@click.option("--expires", default=None, metavar="DURATION", help="Lifetime such as 30d or 12h (default: none).")
@registry_option
def tokens_create(name: str, scopes: tuple[str, ...], expires: str | None, registry: str | None) -> None:
    """Create a token; the secret is printed once and only its hash is stored."""
    from revreg.durations import parse_duration
    from revreg.registry.locate import open_local
    from revreg.registry.tokens import Tokens

    secret, info = Tokens(open_local(registry, "tokens create")).create(
        name, list(scopes), parse_duration(expires, "--expires") if expires else None
    )
    click.echo(secret)
    until = f", expires {info.expires_at.isoformat()}" if info.expires_at else ""
    click.echo(f"token {info.name}: {', '.join(info.scopes)}{until} (shown once; store it as REVREG_TOKEN)", err=True)


@tokens.command("list")
@json_option
@registry_option
def tokens_list(as_json: bool, registry: str | None) -> None:
    """List tokens (names, scopes, expiry, revocation; never secrets)."""
    from revreg.registry.locate import open_local
    from revreg.registry.tokens import Tokens

    infos = Tokens(open_local(registry, "tokens list")).list()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": t.name,
                        "scopes": list(t.scopes),
                        "revoked": t.revoked,
                        "expires_at": t.expires_at.isoformat() if t.expires_at else None,
                    }
                    for t in infos
                ],
                indent=1,
            )
        )
        return
    for t in infos:
        state = "revoked" if t.revoked else f"expires {t.expires_at.isoformat()}" if t.expires_at else "active"
        click.echo(f"{t.name:<20} {state:<32} {', '.join(t.scopes)}")


@tokens.command("revoke")
@click.argument("name")
@registry_option
def tokens_revoke(name: str, registry: str | None) -> None:
    """Revoke a token at once."""
    from revreg.registry.locate import open_local
    from revreg.registry.tokens import Tokens

    info = Tokens(open_local(registry, "tokens revoke")).revoke(name)
    click.echo(f"revoked token {info.name}")


@click.command()
@click.argument("url")
@click.option("--token-stdin", is_flag=True, help="Read the token from standard input (for scripts).")
def login(url: str, token_stdin: bool) -> None:
    """Store an API token for the registry server at URL (~/.config/revreg/credentials.toml, mode 0600).

    The token is asked for without echo (or read from stdin), checked against the server, and
    used by every later command with `--registry URL` when $REVREG_TOKEN is not set.
    """
    import sys

    from revreg.config import save_token
    from revreg.registry.remote import RemoteRegistry

    if not url.startswith(("http://", "https://")):
        raise InputError(f"{url!r}: login is for a registry server, http(s)://HOST:PORT")
    token = sys.stdin.readline() if token_stdin else click.prompt("API token", hide_input=True, err=True)
    token = token.strip()
    if not token:
        raise InputError("no token given")
    who = RemoteRegistry(url, token)._call("GET", "/v1/info")
    path = save_token(url, token)
    click.echo(
        f"logged in to {url.rstrip('/')} as token {who['token']!r} ({', '.join(who['scopes'])}); saved in {path}"
    )


@click.command()
@click.argument("url")
def logout(url: str) -> None:
    """Forget the token stored for URL."""
    from revreg.config import forget_token

    click.echo(f"forgot the token for {url}" if forget_token(url) else f"no token stored for {url}")
