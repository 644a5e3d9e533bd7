"""`vinasmol plan`: memory per GPU in parts, the largest micro-batch, hours, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import run_vinasmol
from vinasmol_core.plan.gpu_plan import GPUS, GiB, find_gpu, plan_recipe
from vinasmol_core.plan.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-360m-vi.yaml"


def test_the_360m_plan_counts_each_part_from_the_stage_policies() -> None:
    recipe = load_recipe(RECIPE)
    plans = {p.stage: p for p in plan_recipe(recipe, GPUS["h100-80gb"], 1)}
    total = 361_821_120 + (55_936 - 49_152) * 960  # SmolLM2-360M, its table extended to 55,936 rows
    eeve3, eeve6 = plans["eeve-3"], plans["eeve-6"]
    assert eeve3.trainable_params == (55_936 - 49_152) * 960  # only the new rows
    assert plans["eeve-4"].trainable_params == 55_936 * 960  # the tied table
    assert eeve6.trainable_params == total
    assert eeve6.parts.weights == total * 4  # bf16-mixed keeps fp32 weights
    assert eeve6.parts.optimizer == 2 * eeve6.parts.gradients == 2 * total * 4  # AdamW's two moments
    # every block passes gradients back; stage 3 also assembles the table from its frozen and new rows
    assert eeve3.parts.activations == eeve6.parts.activations + 2 * 55_936 * 960 * 4
    assert eeve6.activations_checkpointed < eeve6.parts.activations / 10
    assert all(p.fits and p.strategy == "single" for p in plans.values())
    assert eeve6.max_micro_batch == 16  # 32 sequences of 2,048 tokens need more than 90% of 80 GB
    assert eeve6.tokens_per_s == pytest.approx(0.4 * 989e12 / eeve6.flops_per_token)
    assert eeve6.hours == pytest.approx(1.2e9 / eeve6.tokens_per_s / 3600)

    sharded = {p.stage: p for p in plan_recipe(recipe, GPUS["h100-80gb"], 8)}
    assert sharded["eeve-6"].strategy == "ddp"  # `auto` shards from 3B parameters on
    assert sharded["eeve-6"].parts.ddp_buckets == sharded["eeve-6"].parts.gradients
    assert sharded["eeve-6"].gpu_hours == pytest.approx(eeve6.gpu_hours)


def test_fsdp_divides_the_states_and_adds_gather_buffers() -> None:
    recipe = load_recipe(RECIPE, ["stage_defaults.strategy=fsdp"])
    one = {p.stage: p for p in plan_recipe(recipe, GPUS["h100-80gb"], 1)}["eeve-6"]
    eight = {p.stage: p for p in plan_recipe(recipe, GPUS["h100-80gb"], 8)}["eeve-6"]
    assert eight.strategy == "fsdp"
    assert eight.parts.optimizer == pytest.approx(one.parts.optimizer / 8, abs=8)
    assert eight.parts.fsdp_buffers == 2 * 55_936 * 960 * 4  # the table is the largest unit


def test_plan_cli_prints_the_table_and_fails_with_does_not_fit(monkeypatch, capsys) -> None:  # noqa: ANN001
    h100 = ("--gpu", "h100-80gb", "--gpus-per-node", "1")
    code, out, _ = run_vinasmol(monkeypatch, capsys, "plan", str(RECIPE), *h100)
    assert code == 0 and "| eeve-6 | single |" in out and "GPU-hours" in out
    l4 = ("--gpu", "l4-24gb", "--gpus-per-node", "1", "--set", "stage_defaults.micro_batch=64")
    code, out, err = run_vinasmol(monkeypatch, capsys, "plan", str(RECIPE), *l4)
    assert code == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("does not fit: stage eeve-6"))
    assert "the largest part is activations" in line and "stages[eeve-6].micro_batch=4" in line
    assert "activation checkpointing" in line
    code, _, err = run_vinasmol(monkeypatch, capsys, "plan", str(RECIPE), "--gpu", "tpu-v9")
    assert code == 1 and "unknown GPU 'tpu-v9'" in err and "h100-80gb" in err


def test_run_refuses_a_recipe_that_does_not_fit_its_gpu_before_any_step(
    tmp_path, monkeypatch, capsys  # noqa: ANN001
) -> None:
    """compute.gpu names a GPU (the recipe's own, far too small): `vinasmol run` stops before a flow
    run exists, naming the stage and the part; nothing reaches the store."""
    store = tmp_path / "store"
    tiny = ROOT / "recipes" / "tiny-cpu.yaml"
    args = ["--set", "compute.gpus={toy: {memory_gib: 0.001, bf16_tflops: 1}}", "--set", "compute.gpu=toy"]
    code, _, err = run_vinasmol(monkeypatch, capsys, "run", str(tiny), "--store", store.as_uri(), *args)
    assert code == 1 and "does not fit: stage eeve-3" in err and "--force-plan" in err
    assert not store.exists()
    assert find_gpu("toy", load_recipe(tiny, args[1::2]).compute.gpus).memory_bytes == int(0.001 * GiB)


def test_relora_keeps_only_the_adapters_in_the_optimizer() -> None:
    recipe = load_recipe(RECIPE, ["stages[eeve-6].relora={rank: 128}"])
    eeve6 = {p.stage: p for p in plan_recipe(recipe, GPUS["h100-80gb"], 1)}["eeve-6"]
    per_block = {"attn.qkv": (960, 1600), "attn.proj": (960, 960), "mlp.fc_1": (960, 2560),
                 "mlp.fc_2": (960, 2560), "mlp.proj": (2560, 960)}  # SmolLM2-360M's linear layers
    targeted = 32 * sum(i * o for i, o in per_block.values())
    adapters = 32 * 128 * sum(i + o for i, o in per_block.values())
    assert eeve6.trainable_params == 368_333_760
    assert eeve6.optimizer_params == 368_333_760 - targeted + adapters
    assert eeve6.parts.optimizer == 2 * eeve6.optimizer_params * 4
