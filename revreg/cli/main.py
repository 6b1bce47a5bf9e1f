"""The `revreg` command group: shared options, and the one place errors become exit codes."""

from __future__ import annotations

import codecs
import errno
import os
import sys
from typing import Any, TextIO

import click

from revreg import __version__
from revreg.errors import OutputError, RevregError


def _error(message: str) -> None:
    """The one error line. A message quotes anyone's text (arguments, headers, a server's
    answer): its control characters are escaped, so it stays one line and draws nothing."""
    from revreg.cli.options import shown  # not loaded by a command that succeeds (`--help`)

    click.echo(f"revreg: error: {shown(message)}", err=True)


class RevregGroup(click.Group):
    """Turns a RevregError into one line on stderr and its exit code (traceback with -v).

    Commands are loaded on first use from COMMANDS; the help listing reads their summaries from
    the same table, so `revreg --help` imports no command module."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.add_command(load_command(cmd_name), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            loaded = self.commands.get(name)
            if loaded is not None:
                rows.append((name, loaded.get_short_help_str(limit)))
            else:
                # Click's own shortening of a help text, on a stand-in that carries only the summary.
                rows.append((name, click.Command(name, help=COMMANDS[name][2]).get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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
            _error(f"{exc.format_message()}{where}")
            ctx.exit(2)
        except RevregError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            if display is not None:
                display.close()  # the error gets its own line, not the progress bar's
            _error(str(exc))
            ctx.exit(exc.exit_code)
        finally:
            if display is not None:
                display.close()
            os.environ.clear()
            os.environ.update(saved)


def _display_for(ctx: click.Context) -> Any:
    """A progress display when stderr is a terminal and the command is not --quiet."""
    if ctx.params.get("quiet") or sys.stderr is None or not sys.stderr.isatty():  # --json silences it too
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


# Every command, by name: the module and attribute that define it, and the first paragraph of its
# help (what `revreg --help` lists). A command's module is imported only when that command runs
# or its own --help is asked for, so `revreg --help` and `revreg ls` import no more than they use;
# tests/test_cli.py keeps each summary equal to the command's own help.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "attestations": (
        "registry_cmds",
        "attestations",
        "Export REF's certifications as DSSE envelopes, one JSON line each, oldest first.",
    ),
    "audit": ("registry_cmds", "audit", "Read and verify the registry's hash-chained audit log."),
    "base": ("registry_cmds", "base", "Register and list base models."),
    "certify": (
        "verify_cmds",
        "certify",
        "Verify REF from the registry, sign the result, and record it as a certification.",
    ),
    "db": ("registry_cmds", "db", "Show or upgrade the registry database schema."),
    "demo": ("demo_cmd", "demo", "Run the end-to-end demo on an embedded SQLite registry."),
    "export": ("artifacts_cmds", "export", "Write a verified artifact back out as a PEFT LoRA adapter directory."),
    "fsck": (
        "registry_cmds",
        "fsck",
        "Check every blob against its digest and every row against its blob (exit 1 on problems).",
    ),
    "gate": (
        "gate_cmd",
        "gate",
        "Check REF against a release policy: exit 0 if every rule holds, 1 naming the failing ones.",
    ),
    "identity": ("identity_cmd", "identity", "Print the identity hash of the model weights at PATH."),
    "init": ("registry_cmds", "init", "Create a registry (or bring an existing one to the current schema)."),
    "inspect": ("artifacts_cmds", "inspect", "Show an artifact's manifest, digests, signer and signature verdict."),
    "keys": ("keys_cmds", "keys", "Manage Ed25519 signing keys (private keys stay in the keyring directory)."),
    "login": (
        "server_cmds",
        "login",
        "Store an API token for the registry server at URL (~/.config/revreg/credentials.toml, mode 0600).",
    ),
    "logout": ("server_cmds", "logout", "Forget the token stored for URL."),
    "ls": ("ls_cmd", "ls", "List behavior versions (all, or those of NAME)."),
    "pack": ("artifacts_cmds", "pack", "Build one signed behavior artifact bound to a base model's identity."),
    "probes": ("verify_cmds", "probes", "Create, store and list probe sets (the inputs a certification runs)."),
    "publish": (
        "registry_cmds",
        "publish",
        "Publish a certified version (its newest certification by a trusted verifier key says PASS).",
    ),
    "pull": (
        "registry_cmds",
        "pull",
        "Fetch REF (NAME, NAME:VERSION, NAME:TAG or NAME@sha256:...) after re-checking it.",
    ),
    "push": ("registry_cmds", "push", "Store signed artifacts in the registry."),
    "queue": (
        "verify_cmds",
        "queue_list",
        "List certification requests: state, attempts, and the worker holding each.",
    ),
    "serve": ("server_cmds", "serve", "Serve a registry (SQLite or PostgreSQL) over HTTP for teams and CI runners."),
    "show": ("registry_cmds", "show", "Show one version: manifest, state, signer, certifications and history."),
    "tag": (
        "registry_cmds",
        "tag",
        "Point TAG (e.g. latest, stable) of a behavior at REF; refuses downgrades unless allowed.",
    ),
    "tokens": (
        "server_cmds",
        "tokens",
        "Create, list and revoke API tokens for `revreg serve` (on the server's registry).",
    ),
    "verify": (
        "verify_cmds",
        "verify",
        "Run the verifier protocol on BEHAVIOR (a file or NAME:VERSION); record nothing.",
    ),
    "worker": ("verify_cmds", "worker", "Claim queued certification requests and certify them (run one per GPU)."),
    "yank": ("registry_cmds", "yank", "Withdraw a version: it stays recorded but is no longer pulled."),
}
# `keys` also holds the registry's key commands, which live with the other registry commands.
KEYS_FROM_REGISTRY = ("keys_trust", "keys_revoke", "keys_trusted")


def load_command(name: str) -> click.Command:
    """Import the module that defines command `name` and return the command."""
    import importlib

    module, attr, _summary = COMMANDS[name]
    command: click.Command = getattr(importlib.import_module(f"revreg.cli.{module}"), attr)
    if name == "keys" and isinstance(command, click.Group) and "trust" not in command.commands:
        from revreg.cli import registry_cmds

        for extra in KEYS_FROM_REGISTRY:
            command.add_command(getattr(registry_cmds, extra))
    return command


_skip_teardown = False


def skip_teardown() -> None:
    """Called by a command that has written its output and closed everything it opened (its
    database connections, its threads): the process then ends without the interpreter's
    teardown, which frees every module object one by one (measured after loading SQLAlchemy by
    `benchmarks/bench_startup.py --only sql`, docs/performance.md). Only the `revreg` entry point
    acts on it."""
    global _skip_teardown
    _skip_teardown = True


class _Output:
    """The entry point's standard output or error, written straight to its descriptor: every
    byte, or the first error is recorded (the interpreter's own writer can drop the rest of a
    short write to a disk that fills up, and exit 0). After an error, writes are discarded and
    the command runs to its end: its own error, if it has one, is what gets reported; otherwise
    main() reports the lost output (`_lost`)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._fd = stream.fileno()
        # An ASCII locale gets UTF-8, as Click's own writer would give it.
        encoding = stream.encoding or "utf-8"
        self._encoding = "utf-8" if codecs.lookup(encoding).name == "ascii" else encoding
        self._errors = stream.errors or "strict"
        self._pending = bytearray()
        self.failed: OSError | None = None

    def write(self, text: str | bytes) -> int:
        if self.failed is None:
            # Bytes as they are: Click writes bytes here when the stream offers no binary buffer.
            self._pending += text if isinstance(text, bytes | bytearray) else text.encode(self._encoding, self._errors)
            if len(self._pending) >= 1 << 16:
                self.flush()
        return len(text)

    def flush(self) -> None:
        view = memoryview(self._pending)
        try:
            while self.failed is None and len(view):
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.failed = exc
        finally:
            view.release()
            self._pending.clear()

    @property
    def encoding(self) -> str:
        return self._encoding

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":  # everything goes through write(): Click must not find a way around it
            raise AttributeError(name)
        return getattr(self._stream, name)


# A reader that closed the pipe (`revreg ls | head -1`): the command ends quietly with the
# status a shell reports for a process killed by SIGPIPE, as other Unix tools do.
CLOSED_PIPE_EXIT = 128 + 13


def _wrap(stream: TextIO | None) -> _Output | None:
    if stream is None:
        return None  # closed (`>&-`): nothing is written, as the caller asked
    try:
        return _Output(stream)
    except (OSError, ValueError, AttributeError):  # not backed by a descriptor (embedded use)
        return None


def _lost(out: _Output, err: _Output | None) -> int:
    """The exit status of a command that succeeded but whose output could not be written."""
    assert out.failed is not None
    if out.failed.errno == errno.EPIPE:
        return CLOSED_PIPE_EXIT
    if err is not None:
        err.write(f"revreg: error: {OutputError(out.failed)}\n")
        err.flush()
    return OutputError.exit_code


def main() -> None:
    out, err = _wrap(sys.stdout), _wrap(sys.stderr)
    if out is not None:
        sys.stdout = out
    if err is not None:
        sys.stderr = err
    try:
        cli.main(prog_name="revreg", standalone_mode=True)
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    for stream in (out, err):
        if stream is not None:
            stream.flush()
    if out is not None and out.failed is not None and code == 0:
        code = _lost(out, err)
    if _skip_teardown and code == 0:
        os._exit(0)
    sys.exit(code)
