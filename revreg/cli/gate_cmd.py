"""`revreg gate`: check a version against a release policy, with outputs for CI systems."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import click

from revreg.cli.options import json_option
from revreg.cli.registry_cmds import _open, registry_option
from revreg.errors import CheckFailed, InputError, RevregError


def _at(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise InputError(f"--at {value!r} is not an ISO 8601 time within years 1-9999 UTC") from exc


@click.command()
@click.argument("ref")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="TOML policy file: the rules a release needs (see docs/gate.md).",
)
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write JUnit XML here: one test case per rule.",
)
@click.option(
    "--at",
    "at",
    default=None,
    metavar="ISO8601",
    help="The clock the max_age rule reads (default: now); state and certifications are today's.",
)
@json_option
@registry_option
def gate(
    ref: str, policy_path: Path, junit_path: Path | None, at: str | None, as_json: bool, registry: str | None
) -> None:
    """Check REF against a release policy: exit 0 if every rule holds, 1 naming the failing ones.

    Rules cover the publisher and verifier keys, device class, cycles, bitwise restoration,
    minimum behavior effect, the probe set, certification age and revocations. Under GitHub
    Actions it also prints annotations and appends a table to the step summary.
    """
    from revreg.artifacts.safetensors_io import atomic_output
    from revreg.gate.evaluate import evaluate
    from revreg.gate.outputs import github_annotations, junit_xml, step_summary
    from revreg.gate.policy import load_policy

    try:
        policy = load_policy(policy_path)
        report = evaluate(_open(registry), ref, policy, _at(at))
    except RevregError as exc:
        if junit_path:
            from revreg.gate.outputs import junit_error

            with atomic_output(junit_path) as fh:
                fh.write(junit_error(ref, str(exc)))
        raise
    if junit_path:
        with atomic_output(junit_path) as fh:
            fh.write(junit_xml(report))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in github_annotations(report):
            click.echo(line)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(step_summary(report) + "\n")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for r in report.results:
            click.echo(f"{'PASS' if r.passed else 'FAIL'}  {r.rule:<16} {r.message}")
        click.echo(f"gate {'passed' if report.passed else 'FAILED'} for {report.ref} ({report.digest})")
    if not report.passed:
        failed = [r.rule for r in report.results if not r.passed]
        raise CheckFailed(f"gate failed for {report.ref}: {', '.join(failed)}")
