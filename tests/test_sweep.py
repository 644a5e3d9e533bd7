"""Proxy sweeps: the sweep file, the draws, the objective, the regression and the recipe patch
(`vinasmol_core.plan.sweep`), without Prefect. The flow end to end is in test_flows_sweep.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.plan.recipe import load_recipe
from vinasmol_core.plan.sweep import (
    ProxyConfig,
    SweepSpec,
    check_sweep,
    fit_sweep,
    load_sweep,
    objective_value,
    patch_lines,
    patched_recipe_text,
    proxy_recipe,
    proxy_stage,
    sample_configs,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny-cpu.yaml"


def _sweep(**fields: object) -> SweepSpec:
    data = {"name": "t", "stage": "eeve-6", "tokens_per_run": 4096,
            "search": {"mixture": {"vary": ["vi", "en"]}, "lr": {"low": 1e-4, "high": 1e-2}}, **fields}
    return SweepSpec.model_validate(data)


@pytest.fixture(scope="module")
def tiny() -> object:
    return load_recipe(TINY)


def test_shipped_sweep_files_are_valid() -> None:
    for recipe, sweep in [("tiny-cpu.yaml", "tiny-cpu.sweep.yaml"),
                          ("smollm2-360m-vi.yaml", "smollm2-360m-vi.sweep.yaml")]:
        spec = load_sweep(REPO / "recipes" / sweep)
        proxy = proxy_recipe(load_recipe(REPO / "recipes" / recipe), spec)
        stage = check_sweep(proxy, spec)
        assert proxy_stage(stage, sample_configs(stage, spec)[0], spec, "x").max_tokens == spec.tokens_per_run


def test_bad_sweep_files_name_the_field(tmp_path: Path, tiny: object) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "t", "stage": "eeve-6", "tokens_per_run": 8, "rnus": 3}))
    with pytest.raises(ConfigError, match="rnus"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({"name": "t", "stage": "eeve-6", "tokens_per_run": 8,
                                   "search": {"lr": {"low": 1e-2, "high": 1e-3}}}))
    with pytest.raises(ConfigError, match="search.lr"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="cannot read sweep file"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="'eeve-9' is no stage"):
        check_sweep(tiny, _sweep(stage="eeve-9"))
    with pytest.raises(ConfigError, match="search.mixture.vary: fr"):
        check_sweep(tiny, _sweep(search={"mixture": {"vary": ["vi", "fr"]}}))
    with pytest.raises(ConfigError, match="objective.fr"):
        check_sweep(tiny, _sweep(objective={"fr": {"weight": 1.0}}))
    with pytest.raises(ConfigError, match="configs.0: .*mixture: fr"):
        check_sweep(tiny, _sweep(configs=[{"mixture": {"fr": 0.5}}]))
    with pytest.raises(ConfigError, match="fewer than the 4 runs"):
        check_sweep(tiny, _sweep(runs=2))
    with pytest.raises(ConfigError, match="search space is empty"):
        check_sweep(tiny, _sweep(search={}))


def test_draws_keep_the_fixed_weights_and_the_lr_range(tiny: object) -> None:
    spec = _sweep(runs=50, configs=[{"mixture": {"vi": 0.0, "en": 0.95}, "lr": 3e-3}])
    stage = check_sweep(tiny, spec)
    configs = sample_configs(stage, spec)
    assert configs == sample_configs(stage, spec)  # the same seed draws the same runs
    assert configs != sample_configs(stage, spec.model_copy(update={"seed": 1}))
    assert configs[0].mixture == {"vi": 0.0, "en": 0.95, "code": 0.05} and configs[0].lr == 3e-3
    drawn = configs[1:]
    assert len(drawn) == 50
    for c in drawn:
        assert c.mixture["code"] == 0.05  # not varied
        assert math.isclose(c.mixture["vi"] + c.mixture["en"], 0.95, abs_tol=2e-4)
        assert 1e-4 <= c.lr <= 1e-2 and c.global_batch == stage.global_batch
    shares = [c.mixture["vi"] / 0.95 for c in drawn]
    assert 0.4 < float(np.mean(shares)) < 0.75  # around the stage's 0.55 / 0.95
    assert len({round(s, 3) for s in shares}) == 50


def test_proxy_stage_takes_the_configuration_and_budget(tiny: object) -> None:
    spec = _sweep(runs=4, tokens_per_run=8192)
    stage = check_sweep(tiny, spec)
    config = ProxyConfig(mixture={"vi": 0.9, "en": 0.05, "code": 0.05}, lr=5e-3, global_batch=8)
    run = proxy_stage(stage, config, spec, "eeve-6-p00", seed=7)
    assert (run.name, run.lr, run.global_batch, run.seed, run.max_tokens) == ("eeve-6-p00", 5e-3, 8, 7, 8192)
    assert run.mixture == config.mixture and run.trainable == stage.trainable
    assert run.total_steps == 8192 // (8 * stage.seq_len)
    assert run.eval_interval == run.total_steps and run.checkpoint_interval == run.total_steps // 2
    assert run.keep_checkpoints == 1


def test_objective_penalises_english_only_above_its_allowance() -> None:
    spec = _sweep(objective={"vi": {"weight": 1.0}, "en": {"keep_within": 0.02, "penalty": 5.0}})
    base = {"vi": 3.0, "en": 1.0}
    assert objective_value(spec, {"vi": 2.0, "en": 1.01}, base) == pytest.approx(2.0)
    assert objective_value(spec, {"vi": 2.0, "en": 1.12}, base) == pytest.approx(2.0 + 5 * 0.1)
    assert objective_value(spec, {"en": 1.0}, base) is None  # a language missing: no score
    assert "5 x max(0, bpb[en] - 1.02 x base[en])" in spec.objective_text()


def test_fit_finds_a_known_optimum_and_skips_failed_runs(tiny: object) -> None:
    """A smooth objective with its optimum at vi share 0.8 and lr 1e-3, 20 runs (two failed)."""
    spec = _sweep(runs=20, seed=3)
    stage = check_sweep(tiny, spec)
    configs = sample_configs(stage, spec)

    def truth(c: ProxyConfig) -> float:
        return (c.mixture["vi"] / 0.95 - 0.8) ** 2 + 0.05 * (math.log10(c.lr) + 3) ** 2

    objectives: list[float | None] = [truth(c) for c in configs]
    objectives[4] = objectives[9] = None
    fit = fit_sweep(spec, stage, configs, objectives)
    assert fit.used == 18
    assert fit.spearman_loo is not None and fit.spearman_loo > 0.8
    assert abs(fit.best.mixture["vi"] / 0.95 - 0.8) < 0.1, fit.best
    assert abs(math.log10(fit.best.lr) + 3) < 0.4, fit.best
    assert fit.best_measured == min((i for i in range(20) if objectives[i] is not None),
                                    key=lambda i: objectives[i])
    with pytest.raises(ConfigError, match="3 proxy run.s. done"):
        fit_sweep(spec, stage, configs[:3], objectives[:3])


def test_patch_lines_make_a_valid_recipe(tmp_path: Path, tiny: object) -> None:
    stage = check_sweep(tiny, _sweep(runs=4))
    best = ProxyConfig(mixture={"vi": 0.8, "en": 0.15, "code": 0.05}, lr=1.5e-3, global_batch=4)
    lines = patch_lines(stage, best)
    assert lines == ["stages.eeve-6.mixture={vi: 0.8, en: 0.15, code: 0.05}", "stages.eeve-6.lr=0.0015"]
    out = tmp_path / "patched.yaml"
    out.write_text(patched_recipe_text(TINY, lines))
    patched = load_recipe(out)
    six = next(s for s in patched.stages if s.name == "eeve-6")
    assert six.mixture == best.mixture and six.lr == 1.5e-3
    others = [s for s in patched.stages if s.name != "eeve-6"]
    assert others == [s for s in tiny.stages if s.name != "eeve-6"]  # nothing else changed
    assert patch_lines(stage, ProxyConfig(mixture=dict(stage.mixture), lr=stage.lr,
                                          global_batch=stage.global_batch)) == []


def test_a_searched_batch_the_micro_batch_does_not_divide_is_refused_at_check_time(tiny: object) -> None:
    """A batch that no proxy run (or the patched recipe) could train is named before any run."""
    micro4 = load_recipe(TINY, ["stages.eeve-6.micro_batch=4"])
    with pytest.raises(ConfigError, match=r"search.global_batch: 6 does not suit the recipe's stage eeve-6"):
        check_sweep(micro4, _sweep(runs=6, search={"global_batch": [4, 6, 8]}))
    # the proxy's own micro batch (changed by proxy.set) counts too
    proxied = _sweep(runs=6, search={"global_batch": [4, 6, 8]},
                     proxy={"set": ["stages.eeve-6.micro_batch=4"]})
    with pytest.raises(ConfigError, match=r"global_batch: 6 does not suit the proxy recipe's stage eeve-6"):
        check_sweep(tiny, proxied)
    with pytest.raises(ConfigError, match=r"configs.1.global_batch: 6 does not suit"):
        check_sweep(micro4, _sweep(runs=4, configs=[{"global_batch": 8}, {"global_batch": 6}]))
    spec = _sweep(runs=6, search={"global_batch": [4, 8]})
    stage = check_sweep(micro4, spec)
    for i, config in enumerate(sample_configs(stage, spec)):
        proxy_stage(stage, config, spec, f"eeve-6-p{i:02d}")  # every drawn run is a valid stage


def test_the_patch_of_a_stage_named_with_a_dot_applies(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    data["stages"][2]["name"] = "eeve-6.1"
    path = tmp_path / "dotted.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    recipe = load_recipe(path)
    spec = _sweep(stage="eeve-6.1", runs=4, search={"global_batch": [4, 8]})
    stage = check_sweep(recipe, spec)
    best = ProxyConfig(mixture={"vi": 0.8, "en": 0.15, "code": 0.05}, lr=1.5e-3, global_batch=8)
    lines = patch_lines(stage, best, batch_searched=True)
    assert lines[1] == "stages[eeve-6.1].lr=0.0015"
    out = tmp_path / "patched.yaml"
    out.write_text(patched_recipe_text(path, lines), encoding="utf-8")
    patched = next(s for s in load_recipe(out).stages if s.name == "eeve-6.1")
    assert (patched.mixture, patched.lr, patched.global_batch) == (best.mixture, 1.5e-3, 8)


def test_a_fixed_mixture_key_stays_out_of_the_fit(tiny: object) -> None:
    """The annealing share is not varied; it moves only by the rounding of the varied weights. Fed to
    the regression (scaled to unit variance) that noise pulls the choice away from the optimum."""

    def truth(c: ProxyConfig) -> float:  # optimum: vi 0.45 of the total, lr 1e-3
        return (c.mixture["vi"] / sum(c.mixture.values()) - 0.45) ** 2 + 0.05 * (math.log10(c.lr) + 3) ** 2

    chosen = []
    for seed in range(6):
        spec = SweepSpec.model_validate({
            "name": "t", "stage": "annealing", "tokens_per_run": 4096, "runs": 12, "seed": seed,
            "search": {"mixture": {"vary": ["vi", "en", "code"]}, "lr": {"low": 1e-4, "high": 1e-2}}})
        stage = check_sweep(tiny, spec)
        configs = sample_configs(stage, spec)
        chosen.append(truth(fit_sweep(spec, stage, configs, [truth(c) for c in configs]).best))
    assert max(chosen) < 1e-3, chosen
