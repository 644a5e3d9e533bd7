"""ReLoRA in the stage engine: the merge is exact, the optimizer state is pruned, SIGKILL mid-cycle and
at a merge boundary resume bit-identical, frozen tensors stay bit-identical, the final checkpoint is a
plain litgpt one, and ReLoRA on an embedding-only stage is a recipe error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests import test_train_engine
from tests.test_train_engine import (
    _check_litgpt_checkpoint,
    events_of,
    make_job,
    stage_spec,
    step_losses,
    store_of,
    weights,
)
from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.train import params, relora
from vinasmol_core.train.schedule import learning_rate
from vinasmol_core.train.spec import ReLoRASpec, parse_spec

pytestmark = pytest.mark.timeout(300)

env = test_train_engine.env  # the tiny model, dataset and store of the engine tests (a fixture)
RELORA = {"rank": 4, "alpha": 8, "merge_every": 2, "warmup_after_merge": 2}


def tiny_model(cfg: ReLoRASpec):
    from litgpt.model import GPT

    from vinasmol_core.builtin.fixtures import smollm2_config

    torch.manual_seed(0)
    model = GPT(smollm2_config(96, block_size=16))
    params.tie_embeddings(model)
    params.apply_policy(model, "all")
    return model, relora.attach(model, cfg, seed=3)


def test_attach_wraps_the_targets_with_litgpt_lora_and_keeps_names() -> None:
    from litgpt.lora import LoRALinear

    model, adapters = tiny_model(ReLoRASpec(rank=4, targets=["attn.qkv", "mlp.proj"]))
    assert isinstance(model.transformer.h[0].attn.qkv, LoRALinear)
    assert not isinstance(model.transformer.h[0].attn.proj, LoRALinear)
    named = params.named_parameters(model)
    assert adapters == [
        f"transformer.h.{b}.{layer}.{ab}" for b in (0, 1) for layer in ("attn.qkv", "mlp.proj")
        for ab in ("lora_A", "lora_B")
    ]
    qkv = "transformer.h.0.attn.qkv.weight"
    assert qkv in named and not named[qkv].requires_grad  # changes at merges only
    assert named[params.EMBED].requires_grad and all(named[n].requires_grad for n in adapters)
    with pytest.raises(ConfigError, match=r"relora.targets: pattern 'mlp.fc_9'"):
        tiny_model(ReLoRASpec(rank=4, targets=["mlp.fc_9"]))


def test_merge_is_exact_and_starts_fresh_adapters() -> None:
    cfg = ReLoRASpec(rank=4, alpha=8)
    model, _ = tiny_model(cfg)
    layers = relora.adapter_layers(model)
    assert ReLoRASpec(rank=4).alpha == 16 and layers[0].scaling == 2  # alpha defaults to 4 x rank
    with torch.no_grad():
        for layer in layers:  # a trained-looking adapter: B is no longer zero
            layer.lora_B.normal_(0, 0.05)
    x = torch.randint(0, 96, (2, 16))
    before = model(x)
    qkv = model.transformer.h[0].attn.qkv
    base_before = qkv.linear.weight.clone()
    delta = (qkv.lora_B @ qkv.lora_A) * qkv.scaling
    relora.merge(model)
    relora.init_adapters(model, seed=3, cycle=1)
    after = model(x)
    assert (after - before).abs().max().item() < 1e-5
    assert torch.allclose(qkv.linear.weight, base_before + delta, atol=1e-6)
    assert all(not layer.merged and torch.count_nonzero(layer.lora_B) == 0 for layer in layers)
    a1 = qkv.lora_A.clone()
    relora.init_adapters(model, seed=3, cycle=1)  # the same cycle draws the same adapters ...
    assert torch.equal(qkv.lora_A, a1)
    relora.init_adapters(model, seed=3, cycle=2)  # ... the next cycle other ones
    assert not torch.equal(qkv.lora_A, a1)


def test_reset_prunes_the_adapters_moments_by_magnitude() -> None:
    model, adapters = tiny_model(ReLoRASpec(rank=4))
    named = params.named_parameters(model)
    trainable = [p for p in named.values() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(torch.randint(0, 96, (2, 16))).sum().backward()
    optimizer.step()
    tensors = [named[n] for n in adapters]
    embed_avg = optimizer.state[named[params.EMBED]]["exp_avg"].clone()
    a = named[adapters[0]]
    top = optimizer.state[a]["exp_avg"].abs().max()
    relora.reset_moments(optimizer, tensors, 0.99)
    for p in tensors:
        avg, avg_sq = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
        assert torch.count_nonzero(avg) <= avg.numel() - int(0.99 * avg.numel())
        assert torch.equal(avg == 0, avg_sq == 0)  # one mask: no first moment over a zeroed second one
    assert optimizer.state[a]["exp_avg"].abs().max() == top  # the largest entries survive
    assert torch.equal(optimizer.state[named[params.EMBED]]["exp_avg"], embed_avg)  # full rank: kept
    relora.reset_moments(optimizer, tensors, 1.0)
    assert all(torch.count_nonzero(optimizer.state[p]["exp_avg_sq"]) == 0 for p in tensors)
    assert float(optimizer.state[a]["step"]) == 1.0  # bias correction keeps counting


def test_jagged_schedule_restarts_after_each_merge() -> None:
    cfg = ReLoRASpec(merge_every=4, warmup_after_merge=2)
    assert [relora.restart_factor(s, cfg) for s in range(10)] == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1]


def test_relora_is_refused_where_the_stage_trains_no_transformer_weight() -> None:
    from vinasmol_core.plan.recipe import parse_recipe

    root = Path(__file__).resolve().parent.parent
    data = yaml.safe_load((root / "recipes" / "tiny-cpu.yaml").read_text())
    cfg = {"rank": 8, "merge_every": 10, "warmup_after_merge": 2}
    data["stages"][0]["relora"] = cfg  # eeve-3: new-embeddings
    with pytest.raises(ConfigError, match=r"stages\.0: stage eeve-3: relora needs trainable=all"):
        parse_recipe(data, "r.yaml")
    data["stages"][0].pop("relora")
    data["stages"][2]["relora"] = {**cfg, "optimizer_reset": 2}
    with pytest.raises(ConfigError, match=r"stages\.2\.relora\.optimizer_reset"):
        parse_recipe(data, "r.yaml")
    data["stages"][2]["relora"] = cfg
    assert parse_recipe(data, "r.yaml").stages[2].relora.rank == 8
    with pytest.raises(ConfigError, match="relora.warmup_after_merge=20 is above relora.merge_every=10"):
        relora_cfg = {"merge_every": 10, "warmup_after_merge": 20}
        parse_spec(stage_spec("eeve-6", "all", relora=relora_cfg).model_dump())


def relora_spec(name: str, trainable: str, **kw):
    return stage_spec(name, trainable, max_tokens=8 * 4 * 32, checkpoint_interval=3, keep_checkpoints=None,
                      relora=RELORA, **kw)


@pytest.fixture(scope="module")
def reference(env):
    """Stage 6 with ReLoRA (merges after steps 2, 4 and 6 of 8), uninterrupted, in this process."""
    from vinasmol_core.train.engine import run_stage

    return run_stage(make_job(env, relora_spec("eeve-6", "all"), "relora-ref"))


def test_stage6_trains_embeddings_at_full_rank_and_publishes_a_merged_checkpoint(env, reference) -> None:
    init, got = weights(env, env.init_ref), weights(env, reference.digest)
    assert sorted(got) == sorted(init)  # no adapter left: a plain litgpt state dict
    _check_litgpt_checkpoint(Path(store_of(env).fetch(reference.digest)))
    assert all(not torch.equal(init[k], got[k]) for k in init if k != params.HEAD)
    events = events_of(env, reference.digest)
    assert [e["step"] for e in events if e["event"] == "merge"] == [2, 4, 6]
    spec = relora_spec("eeve-6", "all")
    steps = {e["step"] - 1: e for e in events if e["event"] == "step"}
    cosine = {s: learning_rate(s, lr=spec.lr, min_lr=spec.min_lr, warmup_steps=spec.warmup_steps,
                               total_steps=8, schedule="cosine") for s in steps}
    # the adapters' learning rate restarts after each merge; the embeddings' keeps the stage schedule
    jagged = [steps[s]["adapter_lr"] / cosine[s] for s in sorted(steps)]
    assert jagged == pytest.approx([1, 1, 0.5, 1, 0.5, 1, 0.5, 1])
    assert [steps[s]["lr"] / cosine[s] for s in sorted(steps)] == pytest.approx([1] * 8)
    m = reference.metrics
    assert m["relora"] is True and m["relora_merges"] == 3
    assert m["trainable_params"] < m["full_rank_trainable_params"]
    assert m["optimizer_state_bytes"] == 8 * m["trainable_params"]  # fp32 exp_avg + exp_avg_sq
    assert reference.extra["trainable"] == sorted(k for k in init if k != params.HEAD)


def test_interrupted_mid_cycle_and_at_a_merge_resume_bit_identical(env, reference) -> None:
    """Killed after step 4 (newest train-state: step 3, one update into cycle 2), then after step 7
    (newest: step 6, taken right after the third merge); the resumed run equals the uninterrupted one."""
    from vinasmol_core.train import state
    from vinasmol_core.train.process import run_stage_process

    job = make_job(env, relora_spec("eeve-6", "all"), "relora-killed")
    for kill_at, resumed_from in ((4, None), (7, 3)):
        job.fail_at_step = kill_at
        seen: list[dict] = []
        with pytest.raises(VinaSmolError, match="killed"):
            run_stage_process(job, seen.append, echo=False)
        assert seen[0]["resumed_from"] == resumed_from
    store = store_of(env)
    at_merge = Path(store.fetch(f"{job.partial_ref_prefix}/step-00000006"))
    assert state.read_state_json(at_merge)["relora"] == {"merges": 3, "cycle": 3, "position": 0}
    saved = state.load_model_state(at_merge)
    assert torch.count_nonzero(saved["transformer.h.0.attn.qkv.lora_B"]) == 0  # fresh cycle-3 adapters
    mid = state.read_state_json(Path(store.fetch(f"{job.partial_ref_prefix}/step-00000003")))
    assert mid["relora"] == {"merges": 1, "cycle": 1, "position": 1}

    job.fail_at_step = None
    seen = []
    manifest = run_stage_process(job, seen.append, echo=False)
    assert seen[0]["resumed_from"] == 6 and [e["step"] for e in seen if e["event"] == "step"] == [7, 8]
    ref, got = weights(env, reference.digest), weights(env, manifest.digest)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert step_losses(events_of(env, manifest.digest)) == step_losses(events_of(env, reference.digest))


def test_stage7_keeps_frozen_tensors_bit_identical(env) -> None:
    from vinasmol_core.train.engine import run_stage

    spec = stage_spec("eeve-7", "transformer", max_tokens=4 * 4 * 32,
                      relora={**RELORA, "targets": ["attn.*"], "optimizer_reset": 1.0})
    manifest = run_stage(make_job(env, spec, "relora-7"))
    init, got = weights(env, env.init_ref), weights(env, manifest.digest)
    for name in (params.EMBED, "transformer.ln_f.weight"):
        assert torch.equal(init[name], got[name]), name
    changed = {k for k in init if k != params.HEAD and not torch.equal(init[k], got[k])}
    assert changed == {k for k in init if k.startswith("transformer.h.")}  # mlp: full rank, attn: merged
    m = manifest.metrics
    assert m["full_rank_trainable_params"] == sum(init[k].numel() for k in changed)
    assert m["relora_merges"] == 1


def test_a_target_matching_no_layer_fails_before_training(env) -> None:
    spec = stage_spec("eeve-6", "all", relora={**RELORA, "targets": ["attn.*", "mlp.gate"]})
    test_train_engine._error_before_training(
        env, make_job(env, spec, "relora-bad"), r"relora.targets: pattern 'mlp.gate' matches no linear layer"
    )
