"""Whole-model and optimizer state across strategies, on the CPU in one process.

Tested here: the plain path through a real single-device Fabric (full module state, optimizer state
round trip that resumes identically), and the FSDP path of the same functions on torch's own FSDP
(gloo, world size 1, so NO_SHARD) with the state taken under one strategy resumed under the other:
for an untied model and the tied table trained; with the tied table frozen it is a known failure of
torch's FSDP (see the xfail reason), which the stage spec refuses.

CUDA-only, NOT tested here: FSDP through Fabric's FSDPStrategy (Lightning accepts it only on GPUs; the
FSDP tests below hand the functions a stand-in holding a real FSDPStrategy and the rank instead of a
Fabric), a truly sharded gather across several ranks (rank0_only: other ranks get an empty dict),
CPU offload of sharded tensors, and fused AdamW state placed on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from vinasmol_core.train import dist as D
from vinasmol_core.train import params as P
from vinasmol_core.train.state import optimizer_tensors


def _model(seed: int = 0, policy: str | list[str] = "all") -> Any:
    """A tiny litgpt GPT, tied with `policy` applied; policy "untied": separate head, all trainable."""
    from litgpt import Config
    from litgpt.model import GPT

    config = Config(name="tiny", block_size=16, vocab_size=48, padded_vocab_size=48, n_layer=2, n_head=2,
                    n_query_groups=1, n_embd=16, intermediate_size=32, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", bias=False, parallel_residual=False)
    torch.manual_seed(seed)
    model = GPT(config)
    if policy != "untied":
        P.tie_embeddings(model)
        P.apply_policy(model, policy, 40)
    return model


def _names(raw: Any) -> dict[int, str]:
    return {id(p): n for n, p in P.named_parameters(raw).items() if p.requires_grad}


def _adamw(params: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _step(model: Any, optimizer: Any, seed: int) -> None:
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _fabric() -> Any:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    return fabric


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- plain (single device)
def test_single_device_full_state_is_the_canonical_module_state() -> None:
    fabric = _fabric()
    raw = _model()
    expected = {k: v.clone() for k, v in P.module_state(raw).items()}
    model = fabric.setup_module(raw)
    assert not D.is_fsdp(fabric)
    state = D.full_module_state(fabric, model, raw)
    assert set(state) == set(P.named_parameters(raw)) and P.HEAD not in state  # the tied table once
    assert _same(state, expected)


def test_single_device_optimizer_state_round_trip_resumes_identically() -> None:
    fabric = _fabric()
    raw = _model()
    model = fabric.setup_module(raw)
    optimizer = fabric.setup_optimizers(_adamw(raw.parameters()))
    names = _names(raw)
    for seed in range(2):
        _step(model, optimizer, seed)
    raw_opt = getattr(optimizer, "optimizer", optimizer)
    saved = {k: v.clone() for k, v in D.full_optimizer_state(fabric, model, raw_opt, names).items()}
    assert _same(saved, optimizer_tensors(raw_opt, names))
    assert {k.rpartition("/")[0] for k in saved} == set(P.named_parameters(raw))
    weights = {k: v.clone() for k, v in D.full_module_state(fabric, model, raw).items()}

    raw2 = _model(seed=3)
    P.load_module_state(raw2, weights)
    model2 = fabric.setup_module(raw2)
    optimizer2 = fabric.setup_optimizers(_adamw(raw2.parameters()))
    raw_opt2 = getattr(optimizer2, "optimizer", optimizer2)
    D.load_full_optimizer_state(fabric, model2, raw_opt2, _names(raw2), saved)
    _step(model, optimizer, 5)
    _step(model2, optimizer2, 5)
    assert _same(P.module_state(raw), P.module_state(raw2))


def test_optimizer_state_for_a_parameter_the_model_lacks_is_refused() -> None:
    fabric = _fabric()
    raw = _model()
    model = fabric.setup_module(raw)
    optimizer = _adamw(raw.parameters())
    _step(model, optimizer, 0)
    saved = D.full_optimizer_state(fabric, model, optimizer, _names(raw))
    saved["transformer.h.5.norm_1.weight/exp_avg"] = torch.zeros(16)
    fresh = _model(policy="all")
    with pytest.raises(ValueError, match="unknown parameters: .*transformer.h.5.norm_1.weight"):
        D.load_full_optimizer_state(fabric, fresh, _adamw(fresh.parameters()), _names(fresh), saved)


# ----------------------------------------------------------------------------- FSDP (torch, gloo, one rank)
@dataclass
class _FsdpRun:
    """What the functions read from a Fabric under FSDP: its strategy and this process's rank."""

    strategy: Any
    global_rank: int = 0


@pytest.fixture
def fsdp(tmp_path: Path) -> Iterator[_FsdpRun]:
    import torch.distributed as dist
    from lightning.fabric.strategies import FSDPStrategy

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        yield _FsdpRun(FSDPStrategy())
    finally:
        dist.destroy_process_group()


def _wrap(raw: Any) -> Any:
    from litgpt.model import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(raw, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                device_id=torch.device("cpu"))


_NO_SHARD = pytest.mark.filterwarnings(
    "ignore:FSDP is switching to use `NO_SHARD`", "ignore:When using ``NO_SHARD``", "ignore::FutureWarning"
)
_FROZEN_TIED = (
    "with the tied table frozen (EEVE stage 7's policy), torch's FSDP (use_orig_params, here one CPU rank, "
    "NO_SHARD) loses the shared parameter after one forward and backward: the next forward or "
    "full_module_state stops in an FSDP assertion"
)
_POLICIES = [
    pytest.param("untied", id="untied"),
    pytest.param("all", id="tied-all"),
    pytest.param("transformer", id="tied-transformer",
                 marks=pytest.mark.xfail(strict=True, reason=_FROZEN_TIED)),
]


@_NO_SHARD
def test_fsdp_root_is_found_inside_wrappers(fsdp: _FsdpRun) -> None:
    raw = _model()
    model = _wrap(raw)
    assert D.is_fsdp(fsdp) and not D.is_fsdp(_fabric())
    assert D._fsdp_root(model) is model and D._fsdp_root(torch.compile(model)) is model
    with pytest.raises(TypeError, match="expected an FSDP module, got GPT"):
        D._fsdp_root(raw)


def _plain_reference(policy: str, steps: int) -> dict[str, torch.Tensor]:
    """Weights after `steps` plain AdamW steps from the same start (seed 0) on the same batches."""
    model = _model(policy=policy)
    optimizer = _adamw(model.parameters())
    for seed in range(steps):
        _step(model, optimizer, seed)
    return P.module_state(model)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@_NO_SHARD
@pytest.mark.parametrize("policy", _POLICIES)
def test_fsdp_state_has_canonical_names_and_resumes_a_plain_run(fsdp: _FsdpRun, policy: str) -> None:
    """State saved under FSDP (wrapper segments stripped from every name) resumes under the plain
    strategy exactly where an uninterrupted plain run would be."""
    raw = _model(policy=policy)
    model = _wrap(raw)
    optimizer = _adamw(model.parameters())
    _step(model, optimizer, 0)
    weights = {k: v.clone() for k, v in D.full_module_state(fsdp, model, raw).items()}
    saved = {k: v.clone() for k, v in D.full_optimizer_state(fsdp, model, optimizer, {}).items()}
    reference = _model(policy=policy)
    assert set(weights) == set(P.named_parameters(reference))
    assert {k.rpartition("/")[0] for k in saved} == set(P.trainable_names(reference))
    assert {k.rpartition("/")[2] for k in saved} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(float(v) == 1.0 for k, v in saved.items() if k.endswith("/step"))

    plain = _model(seed=7, policy=policy)
    P.load_module_state(plain, weights)
    plain_opt = _adamw(plain.parameters())
    D.load_full_optimizer_state(_fabric(), plain, plain_opt, _names(plain), saved)
    _step(plain, plain_opt, 1)
    _close(P.module_state(plain), _plain_reference(policy, 2))


@_NO_SHARD
@pytest.mark.parametrize("policy", _POLICIES)
def test_plain_state_resumes_under_fsdp(fsdp: _FsdpRun, policy: str) -> None:
    """The other direction: weights and optimizer state of a plain run, put into an FSDP run by canonical
    name, read back unchanged and continue like the plain run."""
    fabric = _fabric()
    plain = _model(policy=policy)
    plain_opt = _adamw(plain.parameters())
    _step(plain, plain_opt, 0)
    saved = {k: v.clone() for k, v in D.full_optimizer_state(fabric, plain, plain_opt, _names(plain)).items()}
    weights = {k: v.clone() for k, v in P.module_state(plain).items()}

    raw = _model(seed=4, policy=policy)
    P.load_module_state(raw, weights)
    model = _wrap(raw)
    optimizer = _adamw(model.parameters())
    D.load_full_optimizer_state(fsdp, model, optimizer, {}, saved)
    reloaded = D.full_optimizer_state(fsdp, model, optimizer, {})
    assert reloaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(reloaded[key], value, msg=key)
    _step(model, optimizer, 1)
    _close(D.full_module_state(fsdp, model, raw), _plain_reference(policy, 2))
