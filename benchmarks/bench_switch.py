"""Switch latency on one loaded base (issue 14): revreg.attach + unload against PEFT's own ways
to switch adapters on a loaded model, in the same run, as ratios (PEFT time / revreg time).

- in memory: `revreg.attach(model, behavior).unload()` with the behavior already loaded,
  against PEFT `set_adapter` between two adapters already loaded;
- from disk: `revreg.load_behavior(path)` (signature and digests checked) + attach + unload,
  against PEFT `load_adapter` + `set_adapter` + `delete_adapter`, and PEFT's hot-swap
  (`peft.utils.hotswap.hotswap_adapter`, which loads the adapter file into the loaded slots);
- what a proof costs: attach(verify=True) + unload(verify=True), and the cost of a full
  re-hash (check="full") beside the cached base check;
- after 1,000 revreg switches, whether the model is bitwise the base (revreg.snapshot).

A LoRA of rank 8 on every linear layer of a GPT-2 of --layers x --dim. Median of --repeat
interleaved rounds of --switches switches each.

    python benchmarks/bench_switch.py [--layers 6] [--dim 256] [--switches 50] [--repeat 5] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_verifier import TARGETS, gpt2, lora_behavior

import revreg
from revreg.artifacts.keys import Keyring


def _per_switch(fn: Callable[[], None], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--switches", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils.hotswap import hotswap_adapter

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ring = Keyring(tmp / "keys")
        ring.generate("bench")
        model = gpt2(args.layers, args.dim, max(1, args.dim // 64))
        art, peft_sd = lora_behavior(tmp, ring, model)
        behavior = revreg.load_behavior(art, trusted=ring.trusted())
        pristine = {k: v.clone() for k, v in model.state_dict().items()}

        # PEFT: a second copy of the base with two adapters loaded, and the adapter on disk.
        peft_base = gpt2(args.layers, args.dim, max(1, args.dim // 64))
        config = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights=False)
        peft_model = get_peft_model(peft_base, config, adapter_name="a")
        peft_model.add_adapter("b", config)
        set_peft_model_state_dict(peft_model, peft_sd, adapter_name="a")
        set_peft_model_state_dict(peft_model, peft_sd, adapter_name="b")
        saved = tmp / "peft"
        peft_model.save_pretrained(saved, selected_adapters=["a"])
        adapter_dir = saved / "a" if (saved / "a").is_dir() else saved
        assert isinstance(peft_model, PeftModel)
        state = {"n": 0}

        def ours_memory() -> None:
            revreg.attach(model, behavior).unload()

        def ours_disk() -> None:
            revreg.attach(model, revreg.load_behavior(art, trusted=ring.trusted())).unload()

        def ours_full() -> None:
            revreg.attach(model, behavior, check="full").unload()

        def ours_proof() -> None:
            revreg.attach(model, behavior, verify=True).unload(verify=True)

        def peft_set() -> None:
            state["n"] += 1
            peft_model.set_adapter("a" if state["n"] % 2 else "b")

        def peft_load() -> None:
            peft_model.load_adapter(adapter_dir, adapter_name="x")
            peft_model.set_adapter("x")
            peft_model.set_adapter("a")
            peft_model.delete_adapter("x")

        def peft_hotswap() -> None:
            hotswap_adapter(peft_model, str(adapter_dir), adapter_name="a")

        methods = {
            "revreg_attach_unload": (ours_memory, args.switches),
            "revreg_load_attach_unload": (ours_disk, max(5, args.switches // 5)),
            "revreg_full_check": (ours_full, max(3, args.switches // 10)),
            "revreg_verified": (ours_proof, max(3, args.switches // 10)),
            "peft_set_adapter": (peft_set, args.switches),
            "peft_load_set_delete": (peft_load, max(5, args.switches // 5)),
            "peft_hotswap": (peft_hotswap, max(5, args.switches // 5)),
        }
        for fn, _ in methods.values():  # warm-up: caches, allocator, lazy imports
            fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(args.repeat):
            for name, (fn, n) in methods.items():
                times[name].append(_per_switch(fn, n))
        ms = {k: round(statistics.median(v) * 1000, 3) for k, v in times.items()}

        snap = revreg.snapshot(model)
        for _ in range(1000):
            revreg.attach(model, behavior).unload()
        snap.verify(model)
        bitwise = all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())

    result = {
        "model": f"gpt2 {args.layers}x{args.dim}, LoRA r8 on {len(TARGETS)} linears per layer",
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "ms_per_switch": ms,
        "ratios": {
            "peft_set_adapter / revreg_attach_unload": round(ms["peft_set_adapter"] / ms["revreg_attach_unload"], 2),
            "peft_load_set_delete / revreg_load_attach_unload": round(
                ms["peft_load_set_delete"] / ms["revreg_load_attach_unload"], 2
            ),
            "peft_hotswap / revreg_load_attach_unload": round(ms["peft_hotswap"] / ms["revreg_load_attach_unload"], 2),
            "revreg_full_check / revreg_attach_unload": round(ms["revreg_full_check"] / ms["revreg_attach_unload"], 1),
            "revreg_verified / revreg_attach_unload": round(ms["revreg_verified"] / ms["revreg_attach_unload"], 1),
        },
        "bitwise_base_after_1000_switches": bitwise,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "switch.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
