"""Verifier benchmarks (issue 4), as ratios against anchors measured in the same run.

- certification cost against its lower bound: the forward passes the protocol needs
  (2 for the determinism check + 2 per cycle) plus one identity hash per fingerprint it needs
  (before anything runs, the reference after warm-up, one per cycle: 2 + cycles); the full
  fingerprint's own cost beside the identity hash it contains;
- attach + unload of a LoRA on every linear layer of a 12-layer GPT-2-sized model against PEFT's
  inject + load + unload of the same adapter;
- memory added by attaching, against the behavior's own tensor bytes.

    python benchmarks/bench_verifier.py [--out bench-out] [--repeat 5] [--parts certification,attach]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from revreg.artifacts.artifact import Attachment, pack, utc_timestamp
from revreg.artifacts.keys import Keyring
from revreg.artifacts.probes import ProbeManifest, write_probes
from revreg.artifacts.sources import identity_of_module
from revreg.verifier.engine import HookEngine, load_behavior
from revreg.verifier.fingerprint import fingerprint
from revreg.verifier.protocol import verify
from revreg.verifier.runner import load_probes, run


def gpt2(layers: int, dim: int, heads: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=dim, n_head=heads, vocab_size=50257, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def lora_behavior(tmp: Path, ring: Keyring, model, rank: int = 8) -> tuple[Path, dict[str, torch.Tensor]]:
    """A signed LoRA on every linear layer, and the same tensors in PEFT's naming."""
    g = torch.Generator().manual_seed(1)
    tensors, atts, peft_sd = {}, [], {}
    modules = dict(model.named_modules())
    for i in range(len(model.transformer.h)):
        for t in TARGETS:
            target = f"transformer.h.{i}.{t}"
            w = modules[target].weight  # Conv1D: [in, out]
            a = torch.randn(rank, w.shape[0], generator=g) * 0.01
            b = torch.randn(w.shape[1], rank, generator=g) * 0.01
            tensors[f"{target}.lora_A"] = ("F32", tuple(a.shape), a.numpy().tobytes())
            tensors[f"{target}.lora_B"] = ("F32", tuple(b.shape), b.numpy().tobytes())
            atts.append(
                Attachment(
                    target,
                    "lora",
                    {"A": f"{target}.lora_A", "B": f"{target}.lora_B"},
                    layer="linear",
                    rank=rank,
                    alpha=float(2 * rank),
                )
            )
            peft_sd[f"base_model.model.{target}.lora_A.weight"] = a
            peft_sd[f"base_model.model.{target}.lora_B.weight"] = b
    out = tmp / "lora.safetensors"
    pack(
        out,
        tensors,
        tuple(atts),
        name="bench",
        version="1",
        base=identity_of_module(model).identity,
        signer=ring.signer("bench"),
        created=utc_timestamp(),
    )
    return out, peft_sd


def bench_attach(tmp: Path, ring: Keyring, repeat: int) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = gpt2(12, 768, 12)
    art, peft_sd = lora_behavior(tmp, ring, model)
    behavior = load_behavior(art, ring.trusted())
    engine = HookEngine()
    ptrs = [p.data_ptr() for p in model.parameters()]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ours = []
    for _ in range(repeat):
        t = time.perf_counter()
        handle = engine.attach(model, behavior)
        attached_bytes = sum(v.numel() * v.element_size() for v in handle.tensors.values())
        handle.unload()
        ours.append(time.perf_counter() - t)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert ptrs == [p.data_ptr() for p in model.parameters()]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), fan_in_fan_out=True)
    peft_times = []
    for _ in range(max(2, repeat // 2)):
        t = time.perf_counter()
        peft_model = get_peft_model(model, config)
        set_peft_model_state_dict(peft_model, peft_sd)
        model = peft_model.unload()
        peft_times.append(time.perf_counter() - t)
    ours_s, peft_s = statistics.median(ours), statistics.median(peft_times)
    return {
        "model": "GPT-2 12 layers x 768, LoRA r=8 on 48 linear layers",
        "revreg_attach_unload_ms": round(ours_s * 1000, 3),
        "peft_inject_load_unload_ms": round(peft_s * 1000, 1),
        "speedup": round(peft_s / ours_s, 1),
        "behavior_bytes": behavior.nbytes,
        "attached_handle_bytes": attached_bytes,
        "rss_growth_during_attach_kib": rss1 - rss0,
        "base_parameters_untouched": True,
    }


def bench_certification(tmp: Path, ring: Keyring, repeat: int, cycles: int = 3) -> dict:
    model = gpt2(4, 256, 4)
    art, _ = lora_behavior(tmp, ring, model)
    behavior = load_behavior(art, ring.trusted())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50257, (16, 32), generator=g)
    manifest = ProbeManifest("bench", ("input_ids",), "logits", "kl", None, 8, 16)
    write_probes(tmp / "p.safetensors", {"input_ids": ("I64", (16, 32), ids.numpy().tobytes())}, manifest)
    probes = load_probes(tmp / "p.safetensors")
    torch.use_deterministic_algorithms(True)
    run(model, probes)  # warm up
    totals, bounds, hashes, fingerprints = [], [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(2 + 2 * cycles):
            run(model, probes)
        for _ in range(2 + cycles):
            identity_of_module(model)
        bounds.append(time.perf_counter() - t)
        t = time.perf_counter()
        identity_of_module(model)
        hashes.append(time.perf_counter() - t)
        t = time.perf_counter()
        fingerprint(model)
        fingerprints.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = verify(model, behavior, probes, cycles=cycles)
        totals.append(time.perf_counter() - t)
        assert result.passed, result.reasons
    bound, total = statistics.median(bounds), statistics.median(totals)
    hash_s, fp_s = statistics.median(hashes), statistics.median(fingerprints)
    return {
        "model": "GPT-2 4 layers x 256 (vocab 50257), 16 probes x 32 tokens, 3 cycles",
        "lower_bound_s": round(bound, 3),
        "certification_s": round(total, 3),
        "ratio": round(total / bound, 3),
        "identity_hash_ms": round(hash_s * 1000, 1),
        "fingerprint_ms": round(fp_s * 1000, 1),
        "fingerprint_beyond_identity_hash_ms": round((fp_s - hash_s) * 1000, 1),
        "fingerprints_per_certification": 2 + cycles,
        "phases": result.timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--parts", default="certification,attach")
    args = parser.parse_args()
    parts = args.parts.split(",")
    args.out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ring = Keyring(tmp / "keys")
        ring.generate("bench")
        results = {}
        if "certification" in parts:
            results["certification"] = bench_certification(tmp, ring, args.repeat)
            print(json.dumps(results["certification"], indent=1), flush=True)
        if "attach" in parts:
            results["attach"] = bench_attach(tmp, ring, args.repeat)
            print(json.dumps(results["attach"], indent=1), flush=True)
    (args.out / "verifier.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
