"""The `revreg` command group: shared options, and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from revreg import __version__
from revreg.errors import RevregError


class RevregGroup(click.Group):
    """Turns a RevregError into one line on stderr and its exit code (traceback with -v)."""

    def invoke(self, ctx: click.Context) -> Any:
        from revreg.progress import showing

        saved = dict(os.environ)  # a profile fills the environment for this command only
        # Other libraries' progress bars (transformers, huggingface_hub, tqdm) never show.
        for var, value in (
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("TQDM_DISABLE", "1"),
            ("TRANSFORMERS_VERBOSITY", "error"),
        ):
            os.environ.setdefault(var, value)
        display = _display_for(ctx)
        try:
            with showing(display):
                return super().invoke(ctx)
        except click.UsageError as exc:
            # A bad argument, option or command name: one line like every other bad input.
            if display is not None:
                display.close()
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"revreg: error: {exc.format_message()}{where}", err=True)
            ctx.exit(2)
        except RevregError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            if display is not None:
                display.close()  # the error gets its own line, not the progress bar's
            click.echo(f"revreg: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        finally:
            if display is not None:
                display.close()
            os.environ.clear()
            os.environ.update(saved)


def _display_for(ctx: click.Context) -> Any:
    """A progress display when stderr is a terminal and the command is not --quiet."""
    if ctx.params.get("quiet") or not sys.stderr.isatty():  # --json silences it too (cli.options)
        return None
    from revreg.cli.display import RichDisplay

    return RichDisplay()


@click.group(cls=RevregGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="revreg")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display (it only ever shows on a terminal).")
@click.option(
    "--profile",
    envvar="REVREG_PROFILE",
    default=None,
    help="Settings profile from ~/.config/revreg/config.toml (default: its [default] table, if any).",
)
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, profile: str | None) -> None:
    """revreg: reversible model behaviors, signed, registered and certified.

    A behavior (LoRA adapter, activation scaler, steering vector) is one signed safetensors
    file bound to the identity hash of the base model it was made for.

    \b
    Exit codes:
      0  success
      1  a check ran and failed (signature, digest, tamper, revoked key, gate, fsck, audit)
      2  bad input or usage (one line on stderr; -v for the traceback)
      3  the registry or server could not be reached
    """
    from revreg.config import profile_settings

    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    for var, value in profile_settings(profile).items():
        os.environ.setdefault(var, value)  # flags and the environment win over the profile


def _register() -> None:
    from revreg.cli import (
        artifacts_cmds,
        demo_cmd,
        gate_cmd,
        identity_cmd,
        keys_cmds,
        registry_cmds,
        server_cmds,
        verify_cmds,
    )

    cli.add_command(identity_cmd.identity)
    cli.add_command(keys_cmds.keys)
    cli.add_command(artifacts_cmds.pack)
    cli.add_command(artifacts_cmds.inspect)
    cli.add_command(artifacts_cmds.export)
    cli.add_command(demo_cmd.demo)
    for command in (
        registry_cmds.init,
        registry_cmds.db,
        registry_cmds.push,
        registry_cmds.pull,
        registry_cmds.ls,
        registry_cmds.show,
        registry_cmds.attestations,
        registry_cmds.tag,
        registry_cmds.publish,
        registry_cmds.yank,
        registry_cmds.base,
        registry_cmds.audit,
        registry_cmds.fsck,
    ):
        cli.add_command(command)
    for command in (
        verify_cmds.probes,
        verify_cmds.verify,
        verify_cmds.certify,
        gate_cmd.gate,
        server_cmds.serve,
        verify_cmds.worker,
        verify_cmds.queue_list,
        server_cmds.tokens,
        server_cmds.login,
        server_cmds.logout,
    ):
        cli.add_command(command)
    for command in (registry_cmds.keys_trust, registry_cmds.keys_revoke, registry_cmds.keys_trusted):
        keys_cmds.keys.add_command(command)


_register()


def main() -> None:
    sys.exit(cli.main(prog_name="revreg", standalone_mode=True))
