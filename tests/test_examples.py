"""examples/serving_loop.py, run as a user runs it, against a real registry."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import revreg
from tests.verifier_helpers import gpt2_setup, make_behavior

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serving_loop.py"


def test_the_serving_loop_runs_against_a_registry(certified_toy: dict[str, str], run, toy, tmp_path: Path) -> None:
    assert run("publish", "toy:1.0.0", env=certified_toy).exit_code == 0
    g = torch.Generator().manual_seed(0)
    requests = tmp_path / "requests.jsonl"
    with requests.open("w") as fh:
        for i in range(1000):
            ids = torch.randint(0, 64, (1, 6), generator=g).tolist()
            fh.write(json.dumps({"behavior": "toy:1.0.0" if i % 2 else None, "input_ids": ids}) + "\n")
    done = subprocess.run(
        [sys.executable, EXAMPLE, "--base", toy["base"], "--factory", "revreg.verifier.toy:build",
         "--behavior", "toy:1.0.0", "--requests", requests],
        env={**os.environ, **certified_toy}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1000 requests, base restored bit for bit" in done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == 1000

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"behavior": "other:1", "input_ids": [[1, 2]]}) + "\n")
    refused = subprocess.run(
        [sys.executable, EXAMPLE, "--base", toy["base"], "--factory", "revreg.verifier.toy:build",
         "--requests", unknown],
        env={**os.environ, **certified_toy}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "other:1" in refused.stderr


def test_a_thousand_switches_leave_the_base_bitwise(tmp_path: Path, keys_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("serving_loop", EXAMPLE)
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    model, first, probes = gpt2_setup(tmp_path, keys_dir)
    second = make_behavior(
        tmp_path, keys_dir, model, [("transformer.h.1.mlp", "steer", {"vector": torch.randn(32)})], name="s"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = revreg.snapshot(model)
    ids = probes.batches[0]["input_ids"][:1]
    plan = [("g", "s", None)[i % 3] for i in range(1000)]
    outs = list(example.serve(model, {"g": first, "s": second}, ((r, ids) for r in plan)))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert all(torch.equal(outs[i], outs[i % 3]) for i in range(1000))  # every switch gives the same answer
    snap.verify(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
