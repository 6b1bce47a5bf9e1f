"""Shared fixtures: a tiny GPT-2 built here, a PEFT adapter made by PEFT itself, keyrings, and
a runner for the real CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from revreg.artifacts.keys import Keyring
from revreg.cli.main import cli

CREATED = "2026-01-01T00:00:00Z"


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
