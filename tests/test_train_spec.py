"""Stage specs, schedules and exact freezing on a tiny GPT (no store, no data, no processes)."""

from __future__ import annotations

import math

import pytest
import torch

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.train import params
from vinasmol_core.train.data import batch_indices
from vinasmol_core.train.schedule import learning_rate
from vinasmol_core.train.spec import StageJob, StageSpec, parse_spec, preset

BASE = 96
VOCAB = 128


def tiny_model(seed: int = 0):
    from litgpt.model import GPT

    from vinasmol_core.builtin.fixtures import smollm2_config

    torch.manual_seed(seed)
    model = GPT(smollm2_config(VOCAB, n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=64))
    model.apply(model._init_weights)
    params.tie_embeddings(model)
    return model


def spec(**kw) -> StageSpec:
    data = dict(
        name="s",
        trainable="all",
        lr=1e-3,
        max_tokens=4096,
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        mixture={"vi": 1.0},
    )
    data.update(kw)
    return StageSpec(**data)


BLOCK = [
    "transformer.h.{i}.norm_1.weight",
    "transformer.h.{i}.attn.qkv.weight",
    "transformer.h.{i}.attn.proj.weight",
    "transformer.h.{i}.norm_2.weight",
    "transformer.h.{i}.mlp.fc_1.weight",
    "transformer.h.{i}.mlp.fc_2.weight",
    "transformer.h.{i}.mlp.proj.weight",
]
TRANSFORMER = sorted(n.format(i=i) for i in range(2) for n in BLOCK)
ALL = sorted([*TRANSFORMER, params.EMBED, "transformer.ln_f.weight"])


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("new-embeddings", [params.NEW_ROWS]),
        ("embeddings", [params.EMBED]),
        ("all", ALL),
        ("transformer", TRANSFORMER),
        (["transformer.ln_f.*", "lm_head.weight"], [params.EMBED, "transformer.ln_f.weight"]),
        (["transformer.h.1.attn.*"], ["transformer.h.1.attn.proj.weight", "transformer.h.1.attn.qkv.weight"]),
    ],
)
def test_policy_selects_exactly(policy, expected) -> None:
    model = tiny_model()
    names = params.apply_policy(model, policy, base_vocab_size=BASE)
    assert names == sorted(expected)
    assert params.is_tied(model)
    named = params.named_parameters(model)
    assert sorted(n for n, p in named.items() if p.requires_grad) == sorted(expected)


def test_pattern_matching_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="transformer.h.9"):
        params.apply_policy(tiny_model(), ["transformer.h.0.*", "transformer.h.9.*"], base_vocab_size=BASE)


def test_new_embeddings_needs_base_vocab() -> None:
    with pytest.raises(ConfigError, match="base_vocab_size"):
        params.apply_policy(tiny_model(), "new-embeddings", base_vocab_size=None)
    with pytest.raises(ConfigError, match="no new token"):
        params.apply_policy(tiny_model(), "new-embeddings", base_vocab_size=VOCAB)


def test_new_embeddings_never_trains_padding_rows() -> None:
    """base_vocab_size == vocab_size < padded_vocab_size: every row the policy would train is padding."""
    from litgpt import Config
    from litgpt.model import GPT

    with torch.device("meta"):
        config = Config(n_layer=1, n_embd=16, n_head=2, block_size=8, vocab_size=100, padded_vocab_size=128)
        model = GPT(config)
    params.tie_embeddings(model)
    with pytest.raises(ConfigError, match="base_vocab_size=100 leaves no new token in the 100-token"):
        params.apply_policy(model, "new-embeddings", base_vocab_size=100)


@pytest.mark.parametrize("policy", ["new-embeddings", "embeddings", "transformer"])
def test_frozen_tensors_and_rows_do_not_move(policy) -> None:
    """A few AdamW steps with weight decay: frozen tensors (and old rows) stay bit-identical."""
    from vinasmol_core.train.runtime import make_optimizer

    model = tiny_model()
    before = {k: v.detach().clone() for k, v in params.plain_state_dict(model).items()}
    trainable = params.apply_policy(model, policy, base_vocab_size=BASE)
    s = spec(trainable=policy, lr=1e-2, weight_decay=0.1)
    optimizer, names = make_optimizer(model, s)
    opt_params = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    assert opt_params == set(trainable)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, VOCAB, (2, 17), generator=g)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = params.plain_state_dict(model)
    assert after[params.HEAD] is after[params.EMBED]
    changed = {k for k in before if k != params.HEAD and not torch.equal(before[k], after[k])}
    if policy == "new-embeddings":
        assert changed == {params.EMBED}
        assert torch.equal(before[params.EMBED][:BASE], after[params.EMBED][:BASE])
        assert not torch.equal(before[params.EMBED][BASE:], after[params.EMBED][BASE:])
    elif policy == "embeddings":
        assert changed == {params.EMBED}
    else:
        assert changed == set(TRANSFORMER)


def test_split_embedding_computes_the_same_logits() -> None:
    model = tiny_model()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(x)
    params.apply_policy(model, "new-embeddings", base_vocab_size=BASE)
    assert torch.equal(model(x), ref)


def test_spec_rules_name_the_fields() -> None:
    with pytest.raises(ConfigError, match="micro_batch=3"):
        spec(global_batch=8, micro_batch=3).check()
    with pytest.raises(ConfigError, match="max_tokens=100 is smaller than one optimizer step"):
        spec(max_tokens=100).check()
    with pytest.raises(ConfigError, match="devices"):
        spec(global_batch=3, micro_batch=1, devices=2).check()
    with pytest.raises(ConfigError, match="lr"):
        parse_spec({"name": "s", "trainable": "all", "lr": -1, "max_tokens": 10, "mixture": {"vi": 1}})
    with pytest.raises(ConfigError, match="trainable"):
        parse_spec({"name": "s", "trainable": "everything", "lr": 1, "max_tokens": 10, "mixture": {"vi": 1}})


def test_fsdp_is_accepted_for_every_policy_on_both_devices() -> None:
    """FSDP2 keeps the frozen tied table and the split new rows (tested as stages in test_train_dist):
    every policy passes the check and gets an FSDP2 Fabric over both devices."""
    from lightning.fabric.strategies import ModelParallelStrategy

    from vinasmol_core.train import runtime

    for policy in ("new-embeddings", "embeddings", "all", "transformer"):
        for accelerator in ("cpu", "cuda"):
            s = spec(trainable=policy, strategy="fsdp", accelerator=accelerator, devices=2)
            s.check()
            assert runtime.resolve_strategy(s) == "fsdp"
        on_cpu = spec(trainable=policy, strategy="fsdp", accelerator="cpu", devices=2)
        fabric = runtime.make_fabric(on_cpu, "cpu")
        assert isinstance(fabric.strategy, ModelParallelStrategy) and fabric.world_size == 2


def test_fp16_mixed_precision_is_refused_with_the_alternatives() -> None:
    """fp16 needs a gradient scaler that skips overflowing steps; the engine has none, so the spec
    refuses it up front and names what works instead."""
    with pytest.raises(ConfigError, match="16-mixed.*bf16-mixed.*32-true"):
        parse_spec({"name": "s", "trainable": "all", "lr": 1, "max_tokens": 10, "mixture": {"vi": 1},
                    "precision": "16-mixed"})


def test_presets_follow_the_recipe() -> None:
    s3, s7, anneal = preset("eeve-3"), preset("eeve-7"), preset("annealing")
    assert (s3.trainable, s3.lr, s3.min_lr, s3.max_tokens) == ("new-embeddings", 1e-3, 1e-5, 200_000_000)
    assert (s3.global_batch, s3.micro_batch, s3.seq_len, s3.weight_decay, s3.betas) == (
        64,
        2,
        2048,
        0.1,
        (0.9, 0.95),
    )
    assert s7.trainable == "transformer"
    assert anneal.schedule == "linear" and anneal.min_lr == 0.0 and "annealing" in anneal.mixture
    assert preset("context-extension").seq_len == 8192


def test_resume_key_ignores_operational_fields() -> None:
    a = StageJob(spec=spec(), init_checkpoint="i", dataset="d")
    b = StageJob(
        spec=spec(devices=2, checkpoint_interval=7, eval_interval=3),
        init_checkpoint="i",
        dataset="d",
        fail_at_step=3,
    )
    c = StageJob(spec=spec(lr=2e-3), init_checkpoint="i", dataset="d")
    assert a.resume_key() == b.resume_key() != c.resume_key()


def test_schedules() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=12)
    cos = [learning_rate(s, schedule="cosine", **kw) for s in range(12)]
    assert cos[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(cos[1:], cos[2:], strict=False))
    assert cos[-1] > 0.1 and math.isclose(learning_rate(12, schedule="cosine", **kw), 0.1)
    lin = [
        learning_rate(s, schedule="linear", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10)
        for s in range(11)
    ]
    assert lin[0] == 1.0 and math.isclose(lin[9], 0.1) and lin[10] == 0.0
    wsd = [learning_rate(s, schedule="warmup-stable-decay", decay_fraction=0.25, **kw) for s in range(12)]
    assert wsd[2:9] == [1.0] * 7 and wsd[9] == 1.0 and wsd[10] < 1.0 and wsd[11] < wsd[10]


def test_ranks_partition_each_global_batch() -> None:
    one = [i for m in range(2) for i in batch_indices(3, m, global_batch=8, micro_batch=4, rank=0, world=1)]
    two = sorted(
        i
        for r in range(2)
        for m in range(2)
        for i in batch_indices(3, m, global_batch=8, micro_batch=2, rank=r, world=2)
    )
    assert one == two == list(range(24, 32))


def test_relora_is_refused_when_auto_resolves_to_fsdp() -> None:
    """`strategy: auto` picks FSDP for a large model on several devices: ReLoRA is refused there too."""
    from vinasmol_core.train import runtime

    relora = {"rank": 4, "alpha": 8, "merge_every": 2, "warmup_after_merge": 1}
    s = spec(name="eeve-6", strategy="auto", devices=2, relora=relora)
    s.check()  # the model's size is not known yet
    assert runtime.resolve_strategy(s, 360_000_000) == "ddp"
    with pytest.raises(ConfigError) as err:
        runtime.resolve_strategy(s, runtime.FSDP_MIN_PARAMS)
    msg = str(err.value)
    assert "stage eeve-6" in msg and "relora" in msg and "strategy=auto" in msg
    assert "FSDP is not supported yet" in msg
    with pytest.raises(ConfigError, match="strategy=auto"):
        runtime.make_fabric(s, "cpu", 3_000_000_000)
    with pytest.raises(ConfigError, match="strategy=fsdp"):
        spec(name="eeve-6", strategy="fsdp", devices=2, relora=relora).check()
    plain = spec(strategy="auto", devices=2)
    assert runtime.resolve_strategy(plain, runtime.FSDP_MIN_PARAMS) == "fsdp"  # without relora: FSDP
