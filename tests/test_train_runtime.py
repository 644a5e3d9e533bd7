"""The stage's strategy: FSDP or DDP from the recipe, by model size where it says `auto`."""

from __future__ import annotations

from vinasmol_core.builtin.fixtures import smollm2_config
from vinasmol_core.train.runtime import FSDP_MIN_PARAMS, count_params, resolve_strategy
from vinasmol_core.train.spec import StageSpec


def _spec(**kw) -> StageSpec:
    return StageSpec(name="s", trainable="all", lr=1e-3, max_tokens=10**9, mixture={"vi": 1.0}, **kw)


def test_auto_shards_large_models_only_and_an_explicit_choice_wins() -> None:
    from dataclasses import asdict

    from litgpt import Config

    smollm2 = count_params(asdict(Config.from_name("SmolLM2-360M")))
    assert 300e6 < smollm2 < 400e6  # the tied table counted once
    tiny = asdict(smollm2_config(1088, block_size=64))
    assert count_params({**tiny, "extra": {"ignored": 1}}) == count_params(tiny) < 10e6
    assert count_params({}) is None
    assert resolve_strategy(_spec(devices=8), smollm2) == "ddp"
    assert resolve_strategy(_spec(devices=8, nodes=2), FSDP_MIN_PARAMS) == "fsdp"
    assert resolve_strategy(_spec(devices=1), 10 * FSDP_MIN_PARAMS) == "single"
    assert resolve_strategy(_spec(devices=8, strategy="ddp"), 10 * FSDP_MIN_PARAMS) == "ddp"
    assert resolve_strategy(_spec(devices=2, strategy="fsdp"), smollm2) == "fsdp"
