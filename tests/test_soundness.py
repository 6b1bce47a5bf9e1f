"""The verifier must not pass what it should fail: each planted fault gives FAIL naming it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from revreg.verifier.protocol import BaseMismatch, verify
from tests.verifier_helpers import FAMILIES, SETUPS, Planted, cnn_setup, make_behavior


@pytest.mark.parametrize("family", SETUPS)
def test_clean_behavior_passes_with_rf_1(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    result = verify(model, behavior, probes, cycles=3)
    assert result.verdict == "PASS", result.reasons
    assert result.rf == 1.0 and result.reset.max_abs == 0.0 and result.adapted.max_abs > 0
    assert all(c.identity_restored and c.state_restored and c.outputs_bitwise for c in result.cycles)


def _first_weight(model: nn.Module) -> tuple[str, torch.Tensor]:
    return next((n, p) for n, p in model.named_parameters() if p.dim() == 2)


def _write_into_weight(state: dict):
    def on_attach(model):
        name, w = _first_weight(model)
        state["name"] = name
        state["delta"] = torch.full_like(w, 0.1)
        with torch.no_grad():
            w.add_(state["delta"])

    def on_unload(model):
        with torch.no_grad():
            _first_weight(model)[1].sub_(state["delta"])

    return on_attach, on_unload


@pytest.mark.parametrize("family", SETUPS)
def test_kind_that_writes_into_a_base_weight_fails(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    state: dict = {}
    on_attach, on_unload = _write_into_weight(state)
    result = verify(model, behavior, probes, engine=Planted(on_attach, on_unload))
    assert result.verdict == "FAIL"
    assert any(
        "base identity not restored" in r and f"tensor {state['name']}: bytes changed" in r for r in result.reasons
    ), result.reasons


@pytest.mark.parametrize("family", SETUPS)
def test_hook_left_behind_after_unload_fails(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    target = behavior.manifest.attachments[0].target
    engine = Planted(on_unload=lambda m: dict(m.named_modules())[target].register_forward_hook(lambda *a: None))
    result = verify(model, behavior, probes, engine=engine)
    assert result.verdict == "FAIL"
    assert any(f"module {target}: hooks _forward_hooks: 0 -> 1" in r for r in result.reasons), result.reasons


@pytest.mark.parametrize("family", SETUPS)
def test_flipped_requires_grad_fails(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    name, _ = _first_weight(model)
    result = verify(
        model, behavior, probes, engine=Planted(on_unload=lambda m: _first_weight(m)[1].requires_grad_(False))
    )
    assert result.verdict == "FAIL"
    assert any(f"tensor {name}: requires_grad True -> False" in r for r in result.reasons), result.reasons


@pytest.mark.parametrize("family", SETUPS)
def test_changed_dtype_fails(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    name, _ = next((n, p) for n, p in model.named_parameters() if p.dim() == 1)

    def to_double(m):
        p = dict(m.named_parameters())[name]
        p.data = p.data.double()

    result = verify(model, behavior, probes, engine=Planted(on_unload=to_double))
    assert result.verdict == "FAIL"
    assert any(f"tensor {name}: dtype torch.float32 -> torch.float64" in r for r in result.reasons), result.reasons


@pytest.mark.parametrize("family", SETUPS)
def test_replaced_submodule_fails_even_with_equal_weights(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    target = behavior.manifest.attachments[0].target
    parent_name, _, child = target.rpartition(".")

    def replace(m):
        parent = dict(m.named_modules())[parent_name]
        setattr(parent, child, copy.deepcopy(getattr(parent, child)))

    result = verify(model, behavior, probes, engine=Planted(on_unload=replace))
    assert result.verdict == "FAIL"
    assert any(f"module {target}: object (replaced)" in r for r in result.reasons), result.reasons


@pytest.mark.parametrize("family", SETUPS)
def test_behavior_bound_to_another_base_is_refused_before_running(family: str, tmp_path: Path, keys_dir: Path):
    model, _, probes = SETUPS[family](tmp_path, keys_dir)
    other = make_behavior(
        tmp_path,
        keys_dir,
        model,
        [(_first_weight(model)[0].rsplit(".", 1)[0], "ia3", {"scale": torch.ones(_first_weight(model)[1].shape[0])})],
        base="sha256:" + "cd" * 32,
        name="other",
    )
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(BaseMismatch, match=r"bound to base sha256:cdcd.*but the model is sha256:.*refusing to run"):
        verify(model, other, probes)
    handle.remove()
    assert calls == []


@pytest.mark.parametrize("family", SETUPS)
def test_inert_behavior_cannot_be_certified(family: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = SETUPS[family](tmp_path, keys_dir)
    att = next(a for a in behavior.manifest.attachments if a.kind == "lora")
    shape_b = behavior.tensors[att.tensors["B"]].shape
    inert = make_behavior(
        tmp_path,
        keys_dir,
        model,
        [(att.target, "lora", {"A": behavior.tensors[att.tensors["A"]], "B": torch.zeros(shape_b)})],
        name="inert",
    )
    result = verify(model, inert, probes)
    assert result.verdict == "FAIL" and result.inert and result.rf is None
    assert any(r.startswith("inert: the behavior does not change the probe outputs") for r in result.reasons)


def test_batchnorm_running_stats_changed_during_attach_fail(tmp_path: Path, keys_dir: Path):
    model, behavior, probes = cnn_setup(tmp_path, keys_dir)
    assert verify(model, behavior, probes).verdict == "PASS"

    def train_step(m):
        m.train()
        with torch.no_grad():
            m(torch.randn(4, 1, 8, 8))
        m.eval()

    result = verify(model, behavior, probes, engine=Planted(on_attach=train_step))
    assert result.verdict == "FAIL"
    assert any("tensor bn.running_mean: bytes changed" in r for r in result.reasons), result.reasons
    assert any("bn.num_batches_tracked" in r for r in result.reasons)


def test_changed_non_persistent_buffer_fails_though_identity_holds(tmp_path: Path, keys_dir: Path):
    model, behavior, probes = cnn_setup(tmp_path, keys_dir)

    def bump(m):
        m.scale.mul_(1.5)

    result = verify(model, behavior, probes, engine=Planted(on_unload=bump))
    assert result.verdict == "FAIL"
    cycle = result.cycles[0]
    assert cycle.identity_restored and not cycle.state_restored
    assert "tensor scale: bytes changed" in cycle.state_diff


def test_training_flag_left_on_fails(tmp_path: Path, keys_dir: Path):
    model, behavior, probes = cnn_setup(tmp_path, keys_dir)
    result = verify(model, behavior, probes, engine=Planted(on_unload=lambda m: m.bn.train()))
    assert result.verdict == "FAIL"
    assert any("module bn: training flag False -> True" in r for r in result.reasons), result.reasons


# -- fingerprint v2: a planted fault of every class the verifier must see ----------------------
#
# Each fault is planted after the real unload, where it changes nothing the probe outputs show
# (or nothing at all in eval mode), so only the fingerprint can catch it. A fault returns the
# function that plants it and the text the FAIL must contain, or None where the family has no
# such part.

Fault = Callable[[nn.Module], tuple[Callable[[nn.Module], object], str] | None]


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """Faults change process-wide state; put it back so no other test sees it."""
    state = (
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_float32_matmul_precision(),
        torch.get_rng_state(),
    )
    yield
    torch.set_grad_enabled(state[0])
    torch.set_default_dtype(state[1])
    torch.use_deterministic_algorithms(state[2])
    torch.set_float32_matmul_precision(state[3])
    torch.set_rng_state(state[4])


def _first(model: nn.Module, cls: type | tuple[type, ...]) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, cls)), None)


def _set(cls: type | tuple[type, ...], attr: str, value: Callable[[nn.Module], object]) -> Fault:
    def fault(model: nn.Module):
        found = _first(model, cls)
        if found is None:
            return None
        path, module = found
        return (
            lambda m: setattr(dict(m.named_modules())[path], attr, value(module))
        ), f"module {path}: attribute {attr}"

    return fault


def _config(field: str) -> Fault:
    def fault(model: nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            return None
        return (
            lambda m: setattr(m.config, field, _other(getattr(m.config, field)))
        ), f"object config: attribute {field}"

    return fault


def _other(value: object) -> object:
    return (not value) if isinstance(value, bool) else value * 2 if isinstance(value, float) else value


def _class_swap(model: nn.Module):
    path, module = _first(model, (nn.Linear, nn.LayerNorm, nn.Conv2d))  # type: ignore[misc]
    cls = type(module)
    same_name = type(cls.__name__, (cls,), {"__qualname__": cls.__qualname__})

    def plant(m: nn.Module) -> None:
        dict(m.named_modules())[path].__class__ = same_name

    return plant, f"module {path}: class"


def _weight(model: nn.Module) -> str:
    return _first_weight(model)[0]


def _tensor_hook(kind: str) -> Fault:
    def fault(model: nn.Module):
        name = _weight(model)

        def plant(m: nn.Module) -> None:
            p = dict(m.named_parameters())[name]
            if kind == "grad":
                p.register_hook(lambda g: g * 0)  # a later fine-tune gets zero gradients
            else:
                p.register_post_accumulate_grad_hook(lambda t: None)

        field = "_backward_hooks" if kind == "grad" else "_post_accumulate_grad_hooks"
        return plant, f"tensor {name}: hooks {field}: 0 -> 1"

    return fault


def _leftover_grad(model: nn.Module):
    name = _weight(model)

    def plant(m: nn.Module) -> None:
        p = dict(m.named_parameters())[name]
        p.grad = torch.zeros_like(p)

    return plant, f"tensor {name}: grad None -> tensor"


def _rebuilt_linear(model: nn.Module):
    found = _first(model, nn.Linear)
    if found is None:
        return None
    path = found[0]

    def plant(m: nn.Module) -> None:
        old = dict(m.named_modules())[path]
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        parent, _, child = path.rpartition(".")
        setattr(dict(m.named_modules())[parent], child, new)

    return plant, f"module {path}: object (replaced)"


def _rewrapped_parameter(model: nn.Module):
    name = _weight(model)
    path, _, attr = name.rpartition(".")

    def plant(m: nn.Module) -> None:
        module = dict(m.named_modules())[path]
        setattr(module, attr, nn.Parameter(getattr(module, attr).data))  # same storage, new object

    return plant, f"tensor {name}: object (replaced)"


def _broken_tie(model: nn.Module):
    if getattr(model, "lm_head", None) is None or model.lm_head.weight is not model.get_input_embeddings().weight:
        return None

    def plant(m: nn.Module) -> None:
        m.lm_head.weight = nn.Parameter(m.lm_head.weight.data)  # storage still shared

    return plant, "tensor lm_head.weight: tied with transformer.wte.weight -> nothing"


def _global(plant: Callable[[], object], expected: str) -> Fault:
    return lambda model: ((lambda m: plant()), expected)


def _swapped_base_hook(model: nn.Module):
    """The base carries a hook of its own; the fault swaps its function under the same key."""
    found = _first(model, (nn.LayerNorm, nn.Linear))
    assert found is not None
    path, module = found
    module.register_forward_hook(lambda mod, args, out: None)

    def plant(m: nn.Module) -> None:
        hooks = dict(m.named_modules())[path]._forward_hooks
        (key,) = hooks
        hooks[key] = lambda mod, args, out: None  # same key, same effect, another function

    return plant, f"module {path}: hooks _forward_hooks (replaced)"


def _negative_zero(model: nn.Module):
    name = next((n for n, p in model.named_parameters() if (p == 0).any() and not p.signbit().any()), None)
    if name is None:
        return None

    def plant(m: nn.Module) -> None:
        p = dict(m.named_parameters())[name]
        with torch.no_grad():
            p[(p == 0).nonzero()[0].tolist()] = -0.0  # equal by value, not by bytes

    return plant, f"tensor {name}: bytes changed"


def _written_and_restored(model: nn.Module):
    name = _weight(model)

    def plant(m: nn.Module) -> None:
        p = dict(m.named_parameters())[name]
        with torch.no_grad():
            p.copy_(p.clone())  # same bytes, but the tensor was written: its version moved

    return plant, f"tensor {name}: version"


FAULTS: dict[str, Fault] = {
    "dropout_p": _set(nn.Dropout, "p", lambda m: m.p + 0.25),
    "layernorm_eps": _set(nn.LayerNorm, "eps", lambda m: m.eps * 10),
    "embedding_max_norm": _set(nn.Embedding, "max_norm", lambda m: float(m.weight.detach().norm(dim=1).max()) * 2),
    "batchnorm_momentum": _set(nn.BatchNorm2d, "momentum", lambda m: 0.5),
    "batchnorm_track_running_stats": _set(nn.BatchNorm2d, "track_running_stats", lambda m: False),
    "config_use_cache": _config("use_cache"),
    "config_layer_norm_epsilon": lambda model: (
        _config("layer_norm_epsilon")(model) if hasattr(getattr(model, "config", None), "layer_norm_epsilon") else None
    ),
    "config_output_hidden_states": _config("output_hidden_states"),
    "class_swapped_for_same_name": _class_swap,
    "tensor_register_hook": _tensor_hook("grad"),
    "tensor_post_accumulate_grad_hook": _tensor_hook("post"),
    "leftover_grad": _leftover_grad,
    "rebuilt_linear_same_parameters": _rebuilt_linear,
    "parameter_rewrapped_same_storage": _rewrapped_parameter,
    "tie_broken_storage_shared": _broken_tie,
    "grad_mode_off": _global(lambda: torch.set_grad_enabled(False), "torch: grad mode True -> False"),
    "default_dtype_float64": _global(
        lambda: torch.set_default_dtype(torch.float64), "torch: default dtype torch.float32 -> torch.float64"
    ),
    "rng_consumed": _global(lambda: torch.rand(1), "torch: cpu rng state"),
    "deterministic_flag": _global(
        lambda: torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled()),
        "torch: deterministic algorithms",
    ),
    "matmul_precision": _global(
        lambda: torch.set_float32_matmul_precision("medium"), "torch: float32 matmul precision 'highest' -> 'medium'"
    ),
    "base_hook_function_swapped": _swapped_base_hook,
    "negative_zero_for_zero": _negative_zero,
    "written_and_restored_exactly": _written_and_restored,
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_planted_fault_fails_naming_it(family: str, fault: str, tmp_path: Path, keys_dir: Path):
    model, behavior, probes = FAMILIES[family](tmp_path, keys_dir)
    planted = FAULTS[fault](model)
    if planted is None:
        pytest.skip(f"{family} has no part for {fault}")
    plant, expected = planted
    result = verify(model, behavior, probes, cycles=2, engine=Planted(on_unload=plant))
    assert result.verdict == "FAIL", (result.verdict, result.reasons)
    assert any(expected in r for r in result.reasons), (expected, result.reasons)
    json.dumps(result.to_dict(), allow_nan=False)
