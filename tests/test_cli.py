"""The command line as a whole: help everywhere, documented, and torch kept off light paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from revreg.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, f"{prefix}{name} "))
    return out


@pytest.mark.parametrize(("name", "command"), _commands(cli), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_has_help_and_is_documented(run, name: str, command: click.Command):
    assert command.help and len(command.help.strip()) > 20
    result = run(*name.split(), "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout
    assert f"revreg {name}" in (ROOT / "docs" / "cli.md").read_text()


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_help_does_not_import_torch():
    mods = _modules_after("from revreg.cli.main import cli\ntry:\n cli.main(['--help'])\nexcept SystemExit:\n pass")
    assert "torch" not in mods and "numpy" not in mods


def test_inspect_does_not_import_torch(artifact: Path, keys_dir: Path):
    code = (
        f"import os; os.environ['REVREG_KEYS'] = {str(keys_dir)!r}\nfrom revreg.cli.main import cli\n"
        f"try:\n cli.main(['inspect', {str(artifact)!r}])\nexcept SystemExit as e:\n assert e.code == 0, e.code"
    )
    assert "torch" not in _modules_after(code)


def test_identity_of_a_file_does_not_import_torch(gpt2_dir: Path):
    code = (
        f"from revreg.cli.main import cli\ntry:\n cli.main(['identity', {str(gpt2_dir)!r}])\n"
        "except SystemExit as e:\n assert e.code == 0, e.code"
    )
    assert "torch" not in _modules_after(code)


def test_console_script_reports_errors_with_exit_2(tmp_path: Path):
    exe = Path(sys.executable).parent / "revreg"
    result = subprocess.run(
        [str(exe), "inspect", str(tmp_path / "missing.safetensors")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_verbose_shows_the_traceback(run, tmp_path: Path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"short")
    result = run("-v", "inspect", bad)
    assert result.exit_code != 0 and result.exception is not None


def test_lazy_table_summaries_are_the_commands_own_help():
    """`revreg --help` lists summaries from main.COMMANDS without importing the commands; each
    must be the first paragraph of the command's own help, so the listing never drifts."""
    from revreg.cli import main

    for name, (_module, _attr, summary) in main.COMMANDS.items():
        command = main.load_command(name)
        assert command.name == name
        assert command.help is not None
        assert command.help.split("\n\n")[0].strip() == summary, name


def test_lazy_help_listing_equals_the_eager_one():
    from revreg.cli import main

    eager = click.Group("revreg", help=cli.help, params=cli.params)
    for name in main.COMMANDS:
        eager.add_command(main.load_command(name), name)
    for width in (60, 80, 120):
        lazy_ctx = click.Context(main.RevregGroup("revreg", help=cli.help, params=cli.params), terminal_width=width)
        eager_ctx = click.Context(eager, terminal_width=width)
        assert lazy_ctx.command.get_help(lazy_ctx) == eager.get_help(eager_ctx)


def test_help_imports_no_command_module_and_ls_only_its_own():
    help_mods = _modules_after(
        "from revreg.cli.main import cli\ntry:\n cli.main(['--help'])\nexcept SystemExit:\n pass"
    )
    assert not {m for m in help_mods if m.startswith("revreg.cli.") and m.endswith(("_cmds", "_cmd"))}
    assert "sqlalchemy" not in help_mods and "cryptography" not in help_mods
    ls_mods = _modules_after(
        "from revreg.cli.main import cli\ntry:\n cli.main(['ls', '--help'])\nexcept SystemExit:\n pass"
    )
    assert "revreg.cli.ls_cmd" in ls_mods and "revreg.cli.registry_cmds" not in ls_mods
