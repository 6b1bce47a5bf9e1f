"""Shared fixtures: a tiny GPT-2 built here, a PEFT adapter made by PEFT itself, keyrings, and
a runner for the real CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from revreg.artifacts.keys import Keyring
from revreg.cli.main import cli

CREATED = "2026-01-01T00:00:00Z"


def minimal_predicate(digest: str, verdict: str = "PASS", finished_at: str | None = None) -> dict:
    """The least a certification predicate must say: the verdict, what ran, and when it ended."""
    from datetime import UTC, datetime

    when = finished_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"verdict": verdict, "behavior": {"digest": digest}, "finished_at": when}


def tiny_gpt2(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt2") / "base"
    tiny_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> Path:
    """A LoRA adapter on Conv1D, Linear-equivalent and Embedding layers, saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "wte"],
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"h.1.attn.c_attn": 3},
        init_lora_weights=False,
    )
    path = tmp_path_factory.mktemp("peft") / "adapter"
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    Keyring(path).generate("alice")
    return path


RunCli = Callable[..., Result]


@pytest.fixture
def run(keys_dir: Path) -> RunCli:
    """Run the real CLI in-process with the test keyring; returns click's Result."""

    def _run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(cli, [str(a) for a in args], env={"REVREG_KEYS": str(keys_dir), **(env or {})})

    return _run


@pytest.fixture
def artifact(run: RunCli, peft_dir: Path, gpt2_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "demo.safetensors"
    result = run(
        "pack",
        "--peft",
        peft_dir,
        "--base",
        gpt2_dir,
        "--name",
        "demo",
        "--version",
        "1.0.0",
        "--key",
        "alice",
        "--created",
        CREATED,
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


# -- registry fixtures -------------------------------------------------------------------------
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    import uuid

    import psycopg

    name = f"revreg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request, tmp_path: Path) -> tuple[str, str | None]:
    """(location, store) for an embedded SQLite registry and for PostgreSQL + a blob directory."""
    if request.param == "sqlite":
        return str(tmp_path / "registry"), None
    return request.getfixturevalue("pg_url"), str(tmp_path / "blobs")


@pytest.fixture
def embedded(keys_dir: Path, tmp_path: Path):
    """An embedded (SQLite) registry trusting `alice`: the ground of the sqlite3-only paths."""
    from revreg.registry.service import Registry

    reg = Registry.init(str(tmp_path / "registry"), actor="tester")
    reg.trust_key(Keyring(keys_dir).public_pem("alice"), "alice", "publisher")
    yield reg
    reg.engine.dispose()


@pytest.fixture
def registry(registry_location, keys_dir: Path):
    """An initialised registry trusting `alice` as publisher and `vera` as verifier."""
    from revreg.registry.service import Registry

    ring = Keyring(keys_dir)
    ring.generate("vera")
    reg = Registry.init(*registry_location, actor="tester")
    reg.trust_key(ring.public_pem("alice"), "alice", "publisher")
    reg.trust_key(ring.public_pem("vera"), "vera", "verifier")
    yield reg
    reg.engine.dispose()


def make_artifact(
    out: Path,
    keys_dir: Path,
    version: str = "1.0.0",
    *,
    name: str = "demo",
    seed: int = 0,
    key: str = "alice",
    size: int = 8,
    **pack_options: Any,
) -> Path:
    """A small signed native artifact (a steering vector of `size` floats) packed by the library;
    `pack_options` go to `pack` (a description, a tensor_hash)."""
    import numpy as np

    from revreg.artifacts.artifact import Attachment, pack

    data = np.random.default_rng(seed).standard_normal(size).astype("<f4").tobytes()
    pack(
        out,
        {"h.0.steer_vector": ("F32", (size,), data)},
        (Attachment("h.0", "steer", {"vector": "h.0.steer_vector"}),),
        name=name,
        version=version,
        base="sha256:" + "ab" * 32,
        signer=Keyring(keys_dir).signer(key),
        created=CREATED,
        **pack_options,
    )
    return out


@pytest.fixture
def toy(tmp_path: Path, run) -> dict[str, Path]:
    """A toy base model file, a signed behavior for it, and a probe set, made through the CLI."""
    import json

    import torch
    from safetensors.torch import save_file

    from revreg.verifier.toy import build

    save_file(build().state_dict(), tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    save_file(
        {"a": torch.randn(4, 32, generator=g), "b": torch.randn(64, 4, generator=g), "v": torch.randn(32, generator=g)},
        tmp_path / "t.safetensors",
    )
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {
                "attachments": [
                    {"target": "up", "kind": "lora", "alpha": 4, "tensors": {"A": "a", "B": "b"}},
                    {"target": "down", "kind": "steer", "tensors": {"vector": "v"}},
                ]
            }
        )
    )
    art = tmp_path / "toy-behavior.safetensors"
    assert (
        run(
            "pack",
            "--tensors",
            tmp_path / "t.safetensors",
            "--spec",
            tmp_path / "spec.json",
            "--base",
            tmp_path / "base.safetensors",
            "--name",
            "toy",
            "--version",
            "1.0.0",
            "--key",
            "alice",
            "--created",
            CREATED,
            "-o",
            art,
        ).exit_code
        == 0
    )
    save_file({"input_ids": torch.randint(0, 64, (10, 12), generator=g)}, tmp_path / "in.safetensors")
    probes = tmp_path / "toy.probes.safetensors"
    result = run(
        "probes",
        "create",
        "--inputs",
        tmp_path / "in.safetensors",
        "--name",
        "toy-probes",
        "--batch-size",
        "4",
        "-o",
        probes,
    )
    assert result.exit_code == 0, result.output
    return {"base": tmp_path / "base.safetensors", "artifact": art, "probes": probes}


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    from tests.server_helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket on the local S3 server, with the AWS environment pointing at it."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("REVREG_STAGING", str(tmp_path / "staging"))
    name = f"revreg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def cli_steps(run: RunCli, env: dict[str, str], *commands: tuple[str | Path, ...]) -> None:
    """Run CLI commands in order; each must succeed."""
    for args in commands:
        result = run(*args, env=env)
        assert result.exit_code == 0, (args, result.output)


@pytest.fixture
def certified_toy(run, toy, keys_dir: Path, tmp_path: Path) -> dict[str, str]:
    """A registry holding toy:1.0.0 and its probe set, certified by `vera` on the CPU with a
    merge baseline; returns the environment that points the CLI at it."""
    env = {"REVREG_REGISTRY": str(tmp_path / "reg")}
    Keyring(keys_dir).generate("vera")
    cli_steps(
        run,
        env,
        ("init",),
        ("keys", "trust", "alice", "--role", "publisher"),
        ("keys", "trust", "vera", "--role", "verifier"),
        ("push", toy["artifact"]),
        ("probes", "push", toy["probes"]),
        (
            "certify",
            "toy:1.0.0",
            "--base",
            toy["base"],
            "--factory",
            "revreg.verifier.toy:build",
            "--probes",
            "toy-probes",
            "--key",
            "vera",
            "--baseline",
            "merge",
        ),
    )
    return env


# -- every registry implementation behind one fixture ------------------------------------------
@dataclass
class Backend:
    kind: str
    api: Any  # a RegistryAPI: what the contract tests speak to
    sql: Any  # the SQL registry behind it, to check effects independently
    location: str  # what --registry takes
    env: dict[str, str]


@pytest.fixture(params=["sqlite", "postgresql", "http"])
def backend(request, tmp_path: Path, keys_dir: Path):
    """The same registry three ways: embedded SQLite, PostgreSQL, and the remote client over a
    real loopback server (on SQLite). `alice` and `vera` exist in the keyring, trusted by nobody."""
    from revreg.registry.locate import open_registry
    from revreg.registry.service import Registry
    from revreg.registry.tokens import Tokens

    Keyring(keys_dir).generate("vera")
    if request.param == "postgresql":
        location, store = request.getfixturevalue("pg_url"), str(tmp_path / "blobs")
    else:
        location, store = str(tmp_path / "registry"), None
    sql = Registry.init(location, store, actor="tester")
    if request.param == "http":
        from revreg.registry.remote import RemoteRegistry
        from tests.server_helpers import running

        secret, _ = Tokens(sql).create("ci", ["admin:*"])
        with running(sql) as url:
            yield Backend("http", RemoteRegistry(url, secret), sql, url, {"REVREG_TOKEN": secret})
    else:
        yield Backend(request.param, open_registry(location, actor="tester"), sql, location, {})
    sql.engine.dispose()
