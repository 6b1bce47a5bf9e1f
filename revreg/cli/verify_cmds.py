"""`revreg probes`, `revreg verify` and `revreg certify`: run the verifier protocol."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from revreg.artifacts.probes import (
    DIVERGENCES,
    OUTPUTS,
    divergence_for,
    from_prompts,
    from_tensors,
    output_for,
    read_probes,
    write_probes,
)
from revreg.cli.options import MODEL, F, json_option, keyring, keys_dir_option, passphrase_env_option
from revreg.cli.options import signer as make_signer
from revreg.cli.registry_cmds import _open, registry_option
from revreg.errors import CheckFailed, InputError


@click.group()
def probes() -> None:
    """Create, store and list probe sets (the inputs a certification runs)."""


@probes.command("create")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file with one prompt per line (needs --tokenizer).",
)
@click.option(
    "--tokenizer",
    type=MODEL,
    help="A local tokenizer: a model directory, or org/name[@revision] from the Hugging Face cache.",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Or: a safetensors file of input tensors, each passed as a keyword argument.",
)
@click.option("--name", required=True, help="Probe set name.")
@click.option(
    "--output",
    "output_name",
    type=click.Choice(OUTPUTS),
    default=None,
    help="Which model output to compare. Default with --prompts: from the model type in the tokenizer "
    "directory's config.json (logits for a causal LM or classifier, last_hidden_state for an encoder); "
    "with --inputs: output.",
)
@click.option(
    "--divergence",
    type=click.Choice(DIVERGENCES),
    default=None,
    help="kl: softmax KL/JS over the last dimension (logits); mse: for hidden states and embeddings. "
    "Default: kl for logits and output, mse for last_hidden_state.",
)
@click.option("--mask", default=None, help="With --inputs: an input whose zeros mark ignored positions.")
@click.option(
    "--max-length",
    type=click.IntRange(1, 1 << 20),
    default=32,
    show_default=True,
    help="Token length (prompts are padded).",
)
@click.option(
    "--batch-size", type=click.IntRange(1, 1 << 20), default=8, show_default=True, help="Probes per forward pass."
)
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def probes_create(
    prompts_file: Path | None,
    tokenizer: Path | None,
    inputs_file: Path | None,
    name: str,
    output_name: str | None,
    divergence: str | None,
    mask: str | None,
    max_length: int,
    batch_size: int,
    out: Path,
) -> None:
    """Build a probe set from prompts and a local tokenizer, or from raw input tensors."""
    if bool(prompts_file) == bool(inputs_file) or (prompts_file and not tokenizer):
        raise InputError("give either --prompts FILE with --tokenizer DIR, or --inputs FILE")
    if prompts_file:
        assert tokenizer is not None
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{prompts_file} is not UTF-8 text (byte {exc.start}): save the prompts as UTF-8") from exc
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        output_name = output_name or output_for(tokenizer)
        divergence = divergence or divergence_for(output_name)
        tensors, manifest = from_prompts(prompts, tokenizer, name, max_length, batch_size, output_name, divergence)
    else:
        assert inputs_file is not None
        output_name = output_name or "output"
        divergence = divergence or divergence_for(output_name)
        tensors, manifest = from_tensors(inputs_file, name, batch_size, output_name, divergence, mask)
    write_probes(out, tensors, manifest)
    click.echo(
        f"probe set {manifest.name}: {manifest.count} probes, compares {manifest.output} by {manifest.divergence} "
        f"-> {out} ({read_probes(out).digest})"
    )


@probes.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@registry_option
def probes_push(file: Path, as_json: bool, registry: str | None) -> None:
    """Store a probe set in the registry (content-addressed)."""
    info, created = _open(registry).push_probes(file)
    if as_json:
        from revreg.registry.api import to_json

        click.echo(json.dumps({"probes": to_json(info), "created": created}, indent=1))
        return
    click.echo(f"{'pushed' if created else 'already present:'} probes {info.name} {info.digest} ({info.count} probes)")


@probes.command("list")
@json_option
@registry_option
def probes_list(as_json: bool, registry: str | None) -> None:
    """List the probe sets in the registry; `*` marks the one a bare name resolves to (the newest
    of that name). Name a set exactly with NAME@sha256:… or its digest."""
    sets = _open(registry).probe_sets()
    if as_json:
        from revreg.registry.api import to_json

        click.echo(json.dumps(to_json(sets), indent=1))
        return
    newest: dict[str, object] = {}
    for p in sorted(sets, key=lambda p: p.created_at):
        newest[p.name] = p
    rows = [("", "NAME", "DIGEST", "PROBES", "OUTPUT", "CREATED")]
    for p in sets:
        mark = "*" if newest[p.name] is p else ""
        created = p.created_at.strftime("%Y-%m-%d %H:%M")
        rows.append((mark, p.name, p.digest, str(p.count), f"{p.output} ({p.divergence})", created))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows))


def verifier_options(f: F) -> F:
    options = [
        click.option(
            "--base",
            "base",
            type=MODEL,
            required=True,
            help="The base model: a Hugging Face directory or org/name[@revision] from the local Hugging Face "
            "cache (never downloaded), or a weights file with --factory.",
        ),
        click.option(
            "--factory",
            default=None,
            metavar="MODULE:FUNCTION",
            help="Python factory that builds the model for a weights file.",
        ),
        click.option(
            "--probes",
            "probes_ref",
            required=True,
            help="A probe set file, or a probe set name (or NAME@sha256:...) in the registry.",
        ),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--cycles", type=int, default=3, show_default=True, help="Attach-run-unload cycles."),
        click.option(
            "--baseline",
            "baselines",
            multiple=True,
            metavar="merge|noise:SIGMA",
            help="Also run a weight-mutation baseline for comparison (repeatable).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _local_or_pulled(
    behaviors: tuple[str, ...], registry: str | None, keys_dir: Path | None, tmp: Path
) -> tuple[list[Path], Any]:
    """`revreg verify` takes files (trusted by the keyring) or registry refs (pinned, pulled);
    several are a stack, all of one kind, so that one set of keys decides whom to trust."""
    files = [Path(b).is_file() for b in behaviors]
    for b, is_file in zip(behaviors, files, strict=True):
        if not is_file and ("/" in b or b.endswith(".safetensors")) and ":" not in b and "@" not in b:
            raise InputError(f"{b} does not exist (a behavior is an artifact file or a registry ref NAME:VERSION)")
    if all(files):
        return [Path(b) for b in behaviors], keyring(keys_dir).trusted()
    if any(files):
        raise InputError("a stack is either artifact files or registry refs, not both: pull the refs first")
    reg = _open(registry)
    paths = []
    for i, ref in enumerate(behaviors):
        version = reg.resolve(ref)
        path = tmp / f"behavior-{i}.safetensors"
        reg.pull(version.pinned, path, allow_unpublished=True)
        paths.append(path)
    return paths, reg.trusted("publisher")


def _print(result: Any, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    from revreg.verifier.protocol import summary_rows

    if as_json:
        click.echo(json.dumps({**result.to_dict(), **(extra or {})}, indent=1))
        return
    for label, value in summary_rows(result):
        click.echo(f"{label:<22} {value}")
    for label, value in (extra or {}).items():
        click.echo(f"{label:<22} {value}")


@click.command()
@click.argument("behaviors", metavar="BEHAVIOR...", nargs=-1, required=True)
@verifier_options
@json_option
@registry_option
@keys_dir_option
def verify(
    behaviors: tuple[str, ...],
    base: Path,
    factory: str | None,
    probes_ref: str,
    device: str,
    cycles: int,
    baselines: tuple[str, ...],
    as_json: bool,
    registry: str | None,
    keys_dir: Path | None,
) -> None:
    """Run the verifier protocol on BEHAVIOR (a file or NAME:VERSION); record nothing.

    Loads the base, checks it is the behavior's base, runs the probes twice (determinism),
    then CYCLES times attaches, runs, unloads and fingerprints the full model state.
    Several BEHAVIORs are a stack: attached in the order given, unloaded together, and the
    proof is that the whole stack leaves the base bit for bit as it was.
    Exit 0 on PASS, 1 on FAIL or INCONCLUSIVE.
    """
    from revreg.certification.certify import ProbeSource
    from revreg.verifier.protocol import verify_files

    with tempfile.TemporaryDirectory(prefix="revreg-verify-") as tmp:
        behavior_paths, trusted = _local_or_pulled(behaviors, registry, keys_dir, Path(tmp))
        local_probes = Path(probes_ref).is_file()
        reg = None if local_probes else _open(registry)
        probes_path, _ = ProbeSource.choose(reg, probes_ref).materialize(reg, Path(tmp))
        result = verify_files(behavior_paths, trusted, probes_path, base, factory, device, cycles, baselines)
    _print(result, as_json)
    if not result.passed:
        raise CheckFailed(f"verification {result.verdict}: {'; '.join(result.reasons)}")


@click.command()
@click.argument("ref")
@verifier_options
@click.option("--key", "key_name", default=None, help="The verifier's signing key (keyring name).")
@click.option(
    "--queue",
    "queued",
    is_flag=True,
    help="Only record a request; `revreg worker` processes (with their own keys) certify it.",
)
@passphrase_env_option
@json_option
@registry_option
@keys_dir_option
def certify(
    ref: str,
    base: Path,
    factory: str | None,
    probes_ref: str,
    device: str,
    cycles: int,
    baselines: tuple[str, ...],
    key_name: str | None,
    queued: bool,
    passphrase_env: str | None,
    as_json: bool,
    registry: str | None,
    keys_dir: Path | None,
) -> None:
    """Verify REF from the registry, sign the result, and record it as a certification.

    With --queue, only record a request for `revreg worker` processes. The result is an
    in-toto Statement about the artifact digest in a DSSE envelope signed by --key, which the
    registry must trust as a verifier. PASS moves the version to certified,
    anything else to rejected. Exit 0 on PASS, 1 otherwise.
    """
    from revreg.certification.certify import ProbeSource
    from revreg.certification.certify import certify as certify_ref

    reg = _open(registry)
    if queued:
        if Path(probes_ref).is_file():
            # A worker runs elsewhere: a local probe set goes into the registry, and the request names its digest.
            probes_ref = reg.push_probes(Path(probes_ref))[0].digest
        request = reg.request_certification(
            ref, str(Path(base).absolute()), probes_ref, factory, device, cycles, baselines
        )
        if as_json:
            from revreg.registry.api import to_json

            click.echo(json.dumps(to_json(request), indent=1))
            return
        click.echo(f"queued certification request {request.id} for {request.ref}")
        return
    if key_name is None:
        raise InputError("certify needs --key VERIFIER_KEY (or --queue to leave it to the workers)")
    signer = make_signer(keys_dir, key_name, passphrase_env)
    done = certify_ref(reg, ref, ProbeSource.choose(reg, probes_ref), base, signer, factory, device, cycles, baselines)
    recorded = done.recorded
    assert recorded is not None
    if as_json:
        from revreg.registry.api import to_json

        extra: dict[str, Any] = {"recorded": to_json(recorded), "pinned": done.version.pinned}
    else:
        extra = {"recorded": f"{recorded.ref} is now {recorded.state} (signed by {signer.name})"}
        extra["pinned"] = done.version.pinned
    _print(done.result, as_json, extra)
    if not done.result.passed:
        raise CheckFailed(f"certification {done.result.verdict}: {'; '.join(done.result.reasons)}")


@click.command()
@click.option("--key", "key_name", required=True, help="This worker's verifier key (keyring name).")
@click.option("--id", "worker_id", default=None, help="Worker name in the queue (default: host:pid).")
@click.option(
    "--lease",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds a claim stays ours without renewal; a dead worker's request is re-claimed after it.",
)
@click.option("--poll", type=float, default=2.0, show_default=True, help="Seconds between looks at an empty queue.")
@click.option("--drain", is_flag=True, help="Exit once no request is queued or running instead of waiting for more.")
@passphrase_env_option
@registry_option
@keys_dir_option
def worker(
    key_name: str,
    worker_id: str | None,
    lease: float,
    poll: float,
    drain: bool,
    passphrase_env: str | None,
    registry: str | None,
    keys_dir: Path | None,
) -> None:
    """Claim queued certification requests and certify them (run one per GPU).

    Claims use FOR UPDATE SKIP LOCKED on PostgreSQL, so many workers share one queue; a worker
    that dies loses its lease and another worker takes the request over. A result is recorded
    only while its worker still holds the lease, so every request is certified exactly once.
    """
    import socket

    from revreg.certification.worker import run_worker

    signer = make_signer(keys_dir, key_name, passphrase_env)
    name = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    done = run_worker(_open(registry), signer, name, lease, poll, drain, log=lambda m: click.echo(m, err=True))
    click.echo(f"{name}: certified {done} requests")


@click.command("queue")
@json_option
@registry_option
def queue_list(as_json: bool, registry: str | None) -> None:
    """List certification requests: state, attempts, and the worker holding each."""
    from revreg.registry.api import to_json

    requests = _open(registry).requests()
    if as_json:
        click.echo(json.dumps(to_json(requests), indent=1))
        return
    for r in requests:
        click.echo(
            f"#{r.id:<5} {r.state:<8} {r.ref:<32} attempts {r.attempts}  {r.lease_owner or '-'}  {r.result or ''}"
        )
