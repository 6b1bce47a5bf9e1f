"""Fault-injection campaign for the verifier (issue 11): after unload, perturb one random piece
of model or process state and require a verdict other than PASS.

    python fuzz/faults.py [--trials 10000] [--seconds 3600] [--seed 0] [--out bench-out/faults.json]

Seeded and bounded in time: trial i draws everything from Random(f"{seed}:{i}"), so any trial
is replayed with `--only i`. Families take turns (toy LM, tiny GPT-2 with tied weights,
all-MiniLM-L6-v2 where its package is installed, a BatchNorm CNN); each trial verifies a fresh
deep copy of the family's base with one cycle. Every PASS is a miss and is printed with the
perturbation that caused it; a raised exception is a crash. The JSON report has the detection
rate per family and per perturbation class, and every miss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from revreg.artifacts.keys import Keyring
from revreg.verifier.protocol import verify
from tests.verifier_helpers import FAMILIES, Planted

Perturb = Callable[[nn.Module, random.Random], str | None]  # plants one change; None: not applicable here


def _modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n or "<root>", m) for n, m in model.named_modules()]


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _plain_attributes(obj: object) -> list[str]:
    return [k for k, v in vars(obj).items() if isinstance(v, bool | int | float | str | tuple) or v is None]


def _changed(value: Any, rng: random.Random) -> Any:
    """A value that differs from `value` in what the fingerprint compares (bits, not ==)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice((-1, 1, 7))
    if isinstance(value, float):
        if math.isnan(value):
            return 0.0
        bits = struct.unpack("<Q", struct.pack("<d", value))[0] ^ (1 << rng.randrange(64))
        return struct.unpack("<d", struct.pack("<Q", bits))[0]  # one bit of the double flipped
    if isinstance(value, str):
        return value + rng.choice(("x", " ", "_"))
    if isinstance(value, tuple):
        return (*value, 0) if not value or rng.random() < 0.5 else value[:-1]
    return rng.choice((0, False, "", ()))  # None


def attribute_value(model: nn.Module, rng: random.Random) -> str | None:
    candidates = [(p, m, k) for p, m in _modules(model) for k in _plain_attributes(m) if k != "training"]
    if not candidates:
        return None
    path, module, key = rng.choice(candidates)
    new = _changed(getattr(module, key), rng)
    object.__setattr__(module, key, new)
    return f"module {path}: {key} = {new!r}"


def config_value(model: nn.Module, rng: random.Random) -> str | None:
    config = getattr(model, "config", None)
    keys = _plain_attributes(config) if config is not None else []
    if not keys:
        return None
    key = rng.choice(keys)
    new = _changed(getattr(config, key), rng)
    config.__dict__[key] = new
    return f"config.{key} = {new!r}"


def tensor_bit(model: nn.Module, rng: random.Random) -> str:
    name, t = rng.choice([(n, t) for n, t in _tensors(model) if t.numel()])
    raw = t.detach().reshape(-1).view(torch.uint8) if t.is_contiguous() else None
    if raw is None:
        return tensor_object(model, rng)
    i, bit = rng.randrange(raw.numel()), rng.randrange(8)
    with torch.no_grad():
        raw[i] ^= 1 << bit
    return f"tensor {name}: byte {i} bit {bit} flipped"


def tensor_byte(model: nn.Module, rng: random.Random) -> str:
    name, t = rng.choice([(n, t) for n, t in _tensors(model) if t.numel() and t.is_contiguous()])
    raw = t.detach().reshape(-1).view(torch.uint8)
    i = rng.randrange(raw.numel())
    with torch.no_grad():
        raw[i] = (int(raw[i]) + rng.randrange(1, 256)) % 256
    return f"tensor {name}: byte {i} rewritten"


def module_hook(model: nn.Module, rng: random.Random) -> str:
    path, module = rng.choice(_modules(model))
    kind = rng.choice(("forward", "forward_pre", "full_backward", "state_dict", "forward_kwargs"))
    if kind == "forward":
        module.register_forward_hook(lambda m, a, o: None)
    elif kind == "forward_pre":
        module.register_forward_pre_hook(lambda m, a: None)
    elif kind == "full_backward":
        module.register_full_backward_hook(lambda m, gi, go: None)
    elif kind == "state_dict":
        module._register_state_dict_hook(lambda m, sd, prefix, local: None)
    else:
        module.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True)
    return f"module {path}: {kind} hook"


def tensor_hook(model: nn.Module, rng: random.Random) -> str | None:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return None
    name, p = rng.choice(params)
    if rng.random() < 0.5:
        p.register_hook(lambda g: g)
        return f"tensor {name}: register_hook"
    p.register_post_accumulate_grad_hook(lambda t: None)
    return f"tensor {name}: post-accumulate-grad hook"


def grad(model: nn.Module, rng: random.Random) -> str:
    name, p = rng.choice(list(model.named_parameters()))
    p.grad = torch.zeros_like(p) if rng.random() < 0.5 else torch.randn_like(p)
    return f"tensor {name}: .grad set"


def flag(model: nn.Module, rng: random.Random) -> str:
    if rng.random() < 0.5:
        path, module = rng.choice(_modules(model))
        module.training = not module.training
        return f"module {path}: training flag flipped (this module only)"
    name, p = rng.choice(list(model.named_parameters()))
    p.requires_grad_(not p.requires_grad)
    return f"tensor {name}: requires_grad flipped"


def tie(model: nn.Module, rng: random.Random) -> str | None:
    owners = [(p, m, k) for p, m in _modules(model) for k, v in m._parameters.items() if v is not None]
    counts = Counter(id(m._parameters[k]) for _, m, k in owners)
    tied = [(p, m, k) for p, m, k in owners if counts[id(m._parameters[k])] > 1]
    if tied and rng.random() < 0.6:
        path, module, key = rng.choice(tied)
        module._parameters[key] = nn.Parameter(module._parameters[key].data)  # storage still shared
        return f"tie broken at {path}.{key}"
    by_shape: dict[tuple[Any, ...], list[tuple[str, nn.Module, str]]] = {}
    for path, module, key in owners:
        t = module._parameters[key]
        by_shape.setdefault((tuple(t.shape), t.dtype), []).append((path, module, key))
    pairs = [group for group in by_shape.values() if len({id(m._parameters[k]) for _, m, k in group}) > 1]
    if not pairs:
        return None
    group = rng.choice(pairs)
    (p1, m1, k1), (p2, m2, k2) = rng.sample(group, 2)
    if m1._parameters[k1] is m2._parameters[k2]:
        return None
    m1._parameters[k1] = m2._parameters[k2]
    return f"new tie: {p1}.{k1} is now {p2}.{k2}"


def tensor_object(model: nn.Module, rng: random.Random) -> str:
    path, module = rng.choice([(p, m) for p, m in _modules(model) if m._parameters or m._buffers])
    registry = rng.choice(
        [r for r in ("_parameters", "_buffers") if any(v is not None for v in getattr(module, r).values())]
    )
    key = rng.choice([k for k, v in getattr(module, registry).items() if v is not None])
    old = getattr(module, registry)[key]
    how = rng.choice(("clone", "same storage", "other dtype", "non-contiguous"))
    if how == "clone":
        new = old.detach().clone()
    elif how == "same storage":
        new = old.detach()
    elif how == "other dtype":
        new = old.detach().to(torch.float64 if old.dtype != torch.float64 else torch.float32)
    else:
        new = old.detach().t().contiguous().t() if old.dim() == 2 else old.detach().clone()
    if registry == "_parameters":
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    getattr(module, registry)[key] = new
    return f"{path}.{key} replaced ({how})"


def module_object(model: nn.Module, rng: random.Random) -> str:
    path, module = rng.choice([(p, m) for p, m in _modules(model) if p != "<root>"])
    parent_path, _, child = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path]
    how = rng.choice(("deep copy", "shallow rebuild", "class swap"))
    if how == "deep copy":
        parent._modules[child] = copy.deepcopy(module)
    elif how == "shallow rebuild":
        new = object.__new__(type(module))
        new.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(module).items()}
        parent._modules[child] = new
    else:
        cls = type(module)
        module.__class__ = type(cls.__name__, (cls,), {"__qualname__": cls.__qualname__})
    return f"module {path}: {how}"


def other_object(model: nn.Module, rng: random.Random) -> str | None:
    choices = []
    if getattr(model, "config", None) is not None:
        choices.append("config")
    hooked = [(p, m) for p, m in _modules(model) if m._forward_hooks]
    if hooked:
        choices.append("hook function")
    choices.append("new attribute")
    choices.append("deleted attribute")
    what = rng.choice(choices)
    if what == "config":
        model.config = copy.deepcopy(model.config)
        return "config replaced by an equal copy"
    if what == "hook function":
        path, module = rng.choice(hooked)
        key = rng.choice(list(module._forward_hooks))
        module._forward_hooks[key] = lambda m, a, o: None
        return f"module {path}: forward hook function swapped under its key"
    path, module = rng.choice(_modules(model))
    if what == "new attribute":
        object.__setattr__(module, f"_leftover_{rng.randrange(1000)}", rng.choice((0, None, "x", (1,))))
        return f"module {path}: attribute added"
    keys = [k for k in vars(module) if not k.startswith("_") and k != "training"]
    if not keys:
        return None
    key = rng.choice(keys)
    object.__delattr__(module, key)
    return f"module {path}: attribute {key} deleted"


def tensor_attribute(model: nn.Module, rng: random.Random) -> str:
    name, t = rng.choice(_tensors(model))
    setattr(t, rng.choice(("_no_weight_decay", "_is_hf_initialized", "tag")), rng.choice((True, 0, "x")))
    return f"tensor {name}: python attribute set"


def class_method(model: nn.Module, rng: random.Random) -> str:
    """A method of one of the model's module classes replaced by an equivalent wrapper."""
    classes = sorted({type(m) for m in model.modules()}, key=lambda c: c.__qualname__)
    cls = rng.choice(classes)
    cls.forward = _wrapped(cls.forward)  # type: ignore[method-assign]
    return f"class {cls.__qualname__}: forward wrapped"


def global_setting(model: nn.Module, rng: random.Random) -> str:
    what = rng.choice(
        (
            "grad mode",
            "default dtype",
            "deterministic",
            "matmul precision",
            "cpu rng",
            "python rng",
            "numpy rng",
            "threads",
            "anomaly",
            "flush denormal",
            "global hook",
            "functional",
        )
    )
    if what == "grad mode":
        torch.set_grad_enabled(not torch.is_grad_enabled())
    elif what == "default dtype":
        torch.set_default_dtype(torch.float64 if torch.get_default_dtype() != torch.float64 else torch.float32)
    elif what == "deterministic":
        torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled())
    elif what == "matmul precision":
        torch.set_float32_matmul_precision(rng.choice(("high", "medium")))
    elif what == "cpu rng":
        torch.rand(rng.randrange(1, 5))
    elif what == "python rng":
        random.random()
    elif what == "numpy rng":
        import numpy as np

        np.random.rand()
    elif what == "threads":
        torch.set_num_threads(max(1, torch.get_num_threads() + rng.choice((-1, 1))))
    elif what == "anomaly":
        torch.autograd.set_detect_anomaly(not torch.is_anomaly_enabled())
    elif what == "flush denormal":
        torch.set_flush_denormal(True)
    elif what == "global hook":
        torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    else:
        name = rng.choice(("linear", "layer_norm", "gelu", "embedding"))
        setattr(torch.nn.functional, name, _wrapped(getattr(torch.nn.functional, name)))
        return f"torch.nn.functional.{name} replaced by a wrapper"
    return f"global: {what}"


def _wrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


PERTURBATIONS: dict[str, Perturb] = {
    "attribute value": attribute_value,
    "config value": config_value,
    "tensor bit": tensor_bit,
    "tensor byte": tensor_byte,
    "module hook": module_hook,
    "tensor hook": tensor_hook,
    ".grad": grad,
    "flag": flag,
    "tie": tie,
    "replaced tensor": tensor_object,
    "replaced module": module_object,
    "replaced object": other_object,
    "global setting": global_setting,
    "tensor attribute": tensor_attribute,
    "class method": class_method,
}


class GlobalState:
    """Process state a trial may change, put back after it so trials stay independent."""

    def __init__(self) -> None:
        import numpy as np

        mod = torch.nn.modules.module
        self.values = (
            torch.is_grad_enabled(),
            torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision(),
            torch.get_rng_state(),
            random.getstate(),
            np.random.get_state(),
            torch.get_num_threads(),
            torch.is_anomaly_enabled(),
        )
        self.hooks = dict(mod._global_forward_hooks)
        self.functional = dict(vars(torch.nn.functional))
        self.forwards = {cls: vars(cls).get("forward") for cls in _all_module_classes()}

    def restore(self) -> None:
        import numpy as np

        (grad, dtype, det, prec, rng, py, npy, threads, anomaly) = self.values
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(det)
        torch.set_float32_matmul_precision(prec)
        torch.set_rng_state(rng)
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_num_threads(threads)
        torch.autograd.set_detect_anomaly(anomaly)
        torch.set_flush_denormal(False)
        mod = torch.nn.modules.module
        mod._global_forward_hooks.clear()
        mod._global_forward_hooks.update(self.hooks)
        for k, v in self.functional.items():
            setattr(torch.nn.functional, k, v)
        for cls, forward in self.forwards.items():
            if forward is not None:
                cls.forward = forward
            elif "forward" in vars(cls):
                delattr(cls, "forward")


def _all_module_classes() -> list[type]:
    out, todo = [], [nn.Module]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def trial(index: int, seed: int, family: str, setups: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    rng = random.Random(f"{seed}:{index}")
    pristine, behavior, probes = setups[family]
    model = copy.deepcopy(pristine)
    planted: dict[str, str] = {}
    order = list(PERTURBATIONS)
    kind = rng.choice(order)

    def plant(m: nn.Module) -> None:
        for name in [kind, *rng.sample(order, len(order))]:  # the drawn class, else any that applies
            what = PERTURBATIONS[name](m, rng)
            if what is not None:
                planted.update(kind=name, what=what)
                return

    state = GlobalState()
    try:
        result = verify(model, behavior, probes, cycles=1, engine=Planted(on_unload=plant))
        json.dumps(result.to_dict(), allow_nan=False)  # every verdict must be a record
        verdict, reason = result.verdict, (result.reasons or [""])[0]
    except Exception as exc:  # a crash of the verifier: reported, never hidden
        verdict, reason = "CRASH", f"{type(exc).__name__}: {exc}"
    finally:
        state.restore()
    return {"trial": index, "family": family, **planted, "verdict": verdict, "reason": reason[:300]}


def build_setups(tmp: Path, families: list[str]) -> dict[str, tuple[Any, ...]]:
    keys = tmp / "keys"
    Keyring(keys).generate("alice")
    setups = {}
    for family in families:
        folder = tmp / family
        folder.mkdir()
        try:
            setups[family] = FAMILIES[family](folder, keys)
        except BaseException as exc:  # pytest.skip from a missing model package
            print(f"{family}: not available ({exc})", flush=True)
    return setups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop starting trials after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--only", type=int, action="append", help="replay these trial indices")
    parser.add_argument("--out", type=Path, default=Path("bench-out") / "faults.json")
    args = parser.parse_args()
    families = args.families.split(",")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        setups = build_setups(Path(tmp_name), families)
        names = [f for f in families if f in setups]
        indices = args.only or range(args.trials)
        for i in indices:
            if time.perf_counter() - start > args.seconds:
                print(f"time bound reached after {len(rows)} trials", flush=True)
                break
            row = trial(i, args.seed, names[i % len(names)], setups)
            rows.append(row)
            if row["verdict"] in ("PASS", "CRASH"):
                print(f"MISS {json.dumps(row)}", flush=True)
            if len(rows) % 500 == 0:
                print(f"{len(rows)} trials, {time.perf_counter() - start:.0f} s", flush=True)
    report = summarize(rows, args.seed, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "misses"}, indent=1))
    print(f"misses: {len(report['misses'])}")


def summarize(rows: list[dict[str, Any]], seed: int, seconds: float) -> dict[str, Any]:
    def rate(sub: list[dict[str, Any]]) -> dict[str, Any]:
        caught = sum(r["verdict"] not in ("PASS", "CRASH") for r in sub)
        return {"trials": len(sub), "detected": caught, "rate": round(caught / len(sub), 6) if sub else None}

    return {
        "seed": seed,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "overall": rate(rows),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
        "by_family": {f: rate([r for r in rows if r["family"] == f]) for f in sorted({r["family"] for r in rows})},
        "by_class": {
            k: rate([r for r in rows if r.get("kind", "?") == k]) for k in sorted({r.get("kind", "?") for r in rows})
        },
        "misses": [r for r in rows if r["verdict"] in ("PASS", "CRASH")],
    }


if __name__ == "__main__":
    main()
