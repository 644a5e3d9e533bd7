"""Whole-model and optimizer state across strategies, on the CPU.

In one process: the plain path through a real single-device Fabric (full module state, optimizer
state round trip that resumes identically), and the FSDP2 path of the same functions (`fully_shard`
on a one-rank gloo mesh) with the state taken under one strategy resumed under the other, for an
untied model, the tied table trained and the tied table frozen.

As stages (two gloo ranks, really sharded, through Fabric's ModelParallelStrategy): FSDP against
DDP at the same global batch, frozen rows bit-identical, and an FSDP group that loses a node and
resumes bit-identical. NOT tested here: NCCL, bf16 on GPUs, fused AdamW state placed on a GPU.
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
    from lightning.fabric.strategies import ModelParallelStrategy

    assert not dist.is_initialized(), "a test before this one left its process group behind"
    dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        yield _FsdpRun(ModelParallelStrategy(parallelize_fn=D.shard_model))
    finally:
        dist.destroy_process_group()


def _wrap(raw: Any) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return D.shard_model(raw, init_device_mesh("cpu", (1,)))


_POLICIES = ["untied", "all", "transformer", "new-embeddings"]


def test_fsdp2_shards_every_parameter(fsdp: _FsdpRun) -> None:
    from torch.distributed.tensor import DTensor

    raw = _model(policy="transformer")
    model = _wrap(raw)
    assert D.is_fsdp(fsdp) and not D.is_fsdp(_fabric())
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tied table


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


@pytest.mark.parametrize("policy", _POLICIES)
def test_fsdp_state_has_canonical_names_and_resumes_a_plain_run(fsdp: _FsdpRun, policy: str) -> None:
    """State saved under FSDP (wrapper segments stripped from every name) resumes under the plain
    strategy exactly where an uninterrupted plain run would be."""
    raw = _model(policy=policy)
    model = _wrap(raw)
    optimizer = _adamw(model.parameters())
    _step(model, optimizer, 0)
    weights = {k: v.clone() for k, v in D.full_module_state(fsdp, model, raw).items()}
    saved = {k: v.clone() for k, v in D.full_optimizer_state(fsdp, model, optimizer, _names(raw)).items()}
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
    D.load_full_optimizer_state(fsdp, model, optimizer, _names(raw), saved)
    reloaded = D.full_optimizer_state(fsdp, model, optimizer, _names(raw))
    assert reloaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(reloaded[key], value, msg=key)
    _step(model, optimizer, 1)
    _close(D.full_module_state(fsdp, model, raw), _plain_reference(policy, 2))


# ----------------------------------------------------------------------------- FSDP stages (two gloo ranks)
@pytest.fixture(scope="module")
def stage_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from vinasmol_core.builtin.fixtures import build_tiny_inputs

    root = tmp_path_factory.mktemp("fsdp-stages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VINASMOL_CACHE", str(root / "cache"))
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        yield build_tiny_inputs(root / "inputs", (root / "store").as_uri(), block_size=64)


def _stage(env: Any, tag: str, **kw: Any) -> Any:
    from vinasmol_core.train.spec import StageJob, StageSpec

    spec = StageSpec(
        name="eeve-3", trainable="new-embeddings", lr=5e-3, min_lr=1e-4, warmup_steps=1,
        max_tokens=6 * 4 * 32, seq_len=32, global_batch=4, micro_batch=2, precision="32-true",
        accelerator="cpu", mixture={"vi": 0.6, "en": 0.3, "code": 0.1}, checkpoint_interval=2,
        eval_interval=3, eval_sequences=2, cpu_threads=1, **kw,
    )
    return StageJob(spec=spec, init_checkpoint=env.init_ref, dataset=env.dataset_ref, store_url=env.store_url,
                    out_ref=f"test/{tag}", partial_ref_prefix=f"test-partial/{tag}")


def _published(env: Any, digest: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from vinasmol_core.store import ArtifactStore
    from vinasmol_core.train.metrics import read_events

    folder = Path(ArtifactStore(env.store_url).fetch(digest))
    return torch.load(folder / "lit_model.pth", weights_only=True), read_events(folder / "metrics.jsonl")


@pytest.mark.timeout(600)
def test_fsdp_stage_matches_ddp_keeps_frozen_rows_and_resumes_bit_identical(stage_env: Any) -> None:
    """EEVE stage 3 (the tied table frozen but for its new rows) sharded over two gloo ranks: the
    gathered checkpoint equals the DDP run's within 1e-5 with the frozen rows bit-identical to the
    input; the same stage on two nodes that loses one after step 5 resumes from step 4 and ends
    bit-identical to the uninterrupted FSDP run."""
    from vinasmol_core.train.process import run_stage_process

    env = stage_env
    fsdp = run_stage_process(_stage(env, "fsdp", devices=2, strategy="fsdp"), echo=False)
    ddp = run_stage_process(_stage(env, "ddp", devices=2, strategy="ddp"), echo=False)
    (w_fsdp, ev_fsdp), (w_ddp, ev_ddp) = _published(env, fsdp.digest), _published(env, ddp.digest)
    assert [e["strategy"] for e in ev_fsdp if e["event"] == "start"] == ["fsdp"]
    assert [e["strategy"] for e in ev_ddp if e["event"] == "start"] == ["ddp"]
    init, _ = _published(env, env.init_ref)
    base = env.base_vocab_size
    assert torch.equal(w_fsdp[P.EMBED][:base], init[P.EMBED][:base])
    assert not torch.equal(w_fsdp[P.EMBED][base:], init[P.EMBED][base:])
    for name in w_ddp:
        torch.testing.assert_close(w_fsdp[name], w_ddp[name], rtol=0, atol=1e-5, msg=name)
        if name not in (P.EMBED, P.HEAD):
            assert torch.equal(w_fsdp[name], init[name]), name  # frozen

    lost = _stage(env, "fsdp-lost", nodes=2, strategy="fsdp")
    lost.fail_at_step = 5
    seen: list[dict] = []
    resumed = run_stage_process(lost, seen.append, echo=False, restarts=1)
    assert [e["resumed_from"] for e in seen if e["event"] == "start"] == [None, 4]
    w_resumed, _ = _published(env, resumed.digest)
    for name in w_fsdp:
        assert torch.equal(w_resumed[name], w_fsdp[name]), name


@pytest.mark.timeout(600)
def test_watchdog_ends_a_stage_whose_rank_hangs_inside_a_step(
    stage_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of a two-rank DDP stage is held inside step 5 (as it reads its first micro-batch);
    rank 0 waits for it in the step's gradient all-reduce. The step watchdog ends the stage within
    its step_timeout, with a message naming the stage, the step, the hung rank and where it hung;
    no rank outlives the stage; the re-run resumes from the train-state of step 4."""
    import threading
    import time

    import psutil

    from vinasmol_core.common.errors import VinaSmolError
    from vinasmol_core.train.hold import HOLD_IN_STEP_ENV, StageHold
    from vinasmol_core.train.process import run_stage_process

    timeout = 10.0
    job = _stage(stage_env, "watchdog", devices=2, strategy="ddp", step_timeout=timeout)
    hold = StageHold(tmp_path, "eeve-3/rank1", 5, env=HOLD_IN_STEP_ENV)
    launched: list[int] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            run_stage_process(job, echo=False, on_launch=lambda pids, _cmds: launched.extend(pids))
        except VinaSmolError as exc:
            failures.append(exc)

    with monkeypatch.context() as mp:
        for key, value in hold.env.items():
            mp.setenv(key, value)
        stage = threading.Thread(target=run)
        stage.start()
        assert hold.wait(stage), "the stage ended before rank 1 reached step 5"
    held_at = time.monotonic()
    ranks = psutil.Process(launched[0]).children(recursive=True)
    assert len(ranks) >= 2
    stage.join()
    took = time.monotonic() - held_at
    hold.close()

    assert len(failures) == 1, "the stage did not fail"
    message = str(failures[0])
    assert "stage eeve-3: rank 1: no optimizer step completed" in message, message
    assert "step 5 of 6 hung in reading micro-batch 0" in message, message
    assert "the last completed step was 4" in message, message
    assert took < 3 * timeout, f"the stage took {took:.0f} s to end after its rank hung"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)

    # the re-run resumes from step 4; devices are not part of the resume key, so one in-process rank
    # stands in for the group (no second torchrun launch)
    seen: list[dict] = []
    one = job.model_copy(update={"spec": job.spec.model_copy(update={"devices": 1})})
    run_stage_process(one, seen.append, echo=False)
    assert [e["resumed_from"] for e in seen if e["event"] == "start"] == [4]
