"""The sweep flow: choose one stage's mixture and learning rate from proxy runs (`vinasmol_core.plan.sweep`).

    prefix:     the pipeline's steps up to the tuned stage, on the proxy recipe (cached like a run's)
    proxy runs: train-stage <stage>-pNN ─► evaluate <stage>-pNN, `parallel` at a time (each cached
                by its configuration; a failed one is reported and left out of the fit)
    fit-sweep:  the regression from configuration to objective, and its predicted best
    check runs: train-stage and evaluate of the predicted best and of the recipe's own values,
                once per check seed

The flow is named `vinasmol` like the pipeline's, so that its deployment is `vinasmol/sweep` beside
`vinasmol/full-cpt`. A sweep killed part way and started again reuses every finished proxy run, and
a proxy run cut short resumes from its newest partial checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import (
    _data_phase,
    _model_phase,
    _open_run,
    _Run,
    _sha,
    _tokenizer_phase,
    _training_phase,
    plan_run,
    with_base_vocab,
)
from tasks.common import slug
from tasks.curves import svg_image
from tasks.sweep import fit_sweep
from tasks.train import train_stage
from vinasmol_core.common.manifests import DatasetManifest
from vinasmol_core.plan.recipe import HarnessSection, LongEvalSection, Recipe
from vinasmol_core.plan.sweep import (
    ProxyConfig,
    SweepFit,
    SweepSpec,
    check_stage,
    check_sweep,
    load_sweep,
    objective_value,
    patch_lines,
    proxy_recipe,
    proxy_stage,
    recipe_config,
    sample_configs,
    scatter_svgs,
    sweep_markdown,
    tuned_stage,
)
from vinasmol_core.train.spec import StageSpec


def _bpb_only(recipe: Recipe, sweep: SweepSpec) -> Recipe:
    """The proxy recipe under its own name (its refs apart from the recipe's runs), evaluating bits
    per byte only."""
    bpb_only = {"long": LongEvalSection(after=[]), "harness": HarnessSection()}
    evaluation = recipe.eval.model_copy(update=bpb_only)
    return recipe.model_copy(update={"name": f"{recipe.name}-sweep-{sweep.name}", "eval": evaluation})


def _start_checkpoint(ctx: _Run, index: int) -> tuple[str, str, dict[str, DatasetManifest]]:
    """The prefix of the proxy recipe: the checkpoint the tuned stage (at `index`) starts from, its
    evaluation label, and the datasets of the stages up to the tuned one."""
    base, tokenizer = _tokenizer_phase(ctx)
    datasets = _data_phase(ctx, tokenizer.digest, _sha(tokenizer), ctx.recipe.stages[: index + 1])
    previous = _model_phase(ctx, base, tokenizer)
    if index:
        previous, _ = _training_phase(ctx, previous, datasets, stop=index)
    return previous, ctx.recipe.stages[index - 1].name if index else "init", datasets


def _run_batch(ctx: _Run, sweep: SweepSpec, jobs: list[tuple[str, str, StageSpec, ProxyConfig]],
               start: str, dataset: str) -> list[dict[str, Any]]:
    """Train and evaluate proxy runs, `sweep.parallel` at a time; one row per run, failures included."""
    logger = get_run_logger()
    rows: list[dict[str, Any]] = []
    base = ctx.result["bpb"].get("base", {})
    for at in range(0, len(jobs), sweep.parallel):
        batch = jobs[at : at + sweep.parallel]
        futures = [
            ctx.run.submit(train_stage, spec.name, spec=spec, init_checkpoint=start, dataset=dataset,
                           stage_runner=ctx.plan.stage_runner, logging=ctx.recipe.logging)
            for _, _, spec, _ in batch
        ]
        for (kind, seed, spec, config), future in zip(batch, futures, strict=True):
            future.wait()
            state = future.state
            row: dict[str, Any] = {"run": spec.name, "kind": kind, "seed": seed, "steps": spec.total_steps,
                                   **config.model_dump(), "bpb": {}, "objective": None}
            if not state.is_completed():
                row["status"] = "failed"
                row["error"] = " ".join(str(state.message or state.name).split())[:300]
                logger.warning("proxy run %s failed: %s", spec.name, row["error"])
                rows.append(row)
                continue
            trained = future.result()
            row["status"] = "cached" if state.name == "Cached" else "trained"
            ctx.evaluate(trained.checkpoint.digest, spec.name, spec.name)
            row["bpb"] = ctx.result["bpb"][spec.name]
            row["objective"] = objective_value(sweep, row["bpb"], base)
            logger.info("proxy run %s (%s): objective %s", spec.name, row["status"], row["objective"])
            rows.append(row)
    return rows


def run_sweep(recipe_path: str, sweep: SweepSpec, store: str | None = None, stage_runner: str | None = None,
              hub_mirror: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The flow's body (inside a flow run); see the module docstring."""
    plan = plan_run(recipe_path, store, stage_runner=stage_runner, hub_mirror=hub_mirror, overrides=overrides)
    user_stage = check_sweep(plan.recipe, sweep)  # the user's recipe and its proxy, before any run
    proxy = _bpb_only(proxy_recipe(plan.recipe, sweep), sweep)
    index, _ = tuned_stage(proxy, sweep)
    ctx = _open_run(replace(plan, recipe=proxy))
    start, start_label, datasets = _start_checkpoint(ctx, index)
    stage = with_base_vocab(ctx, check_stage(proxy, sweep))
    dataset_digest = datasets[proxy.stage_dataset(stage)].digest

    configs = sample_configs(stage, sweep)
    jobs = [("proxy", stage.seed, proxy_stage(stage, c, sweep, f"{stage.name}-p{i:02d}"), c)
            for i, c in enumerate(configs)]
    rows = _run_batch(ctx, sweep, jobs, start, dataset_digest)
    fit: SweepFit = ctx.run(fit_sweep, sweep=sweep, stage=stage, configs=configs,
                            objectives=[r["objective"] for r in rows])
    checks = []
    for seed in sweep.check_seeds:
        for kind, config in (("best", fit.best), ("recipe", recipe_config(stage))):
            spec = proxy_stage(stage, config, sweep, f"{stage.name}-{kind}-s{seed}", seed)
            checks.append((kind, seed, spec, config))
    rows += _run_batch(ctx, sweep, checks, start, dataset_digest)
    result: dict[str, Any] = {
        "sweep": sweep.name, "recipe": plan.recipe.name, "stage": stage.name, "store": plan.store_url,
        "objective": sweep.objective_text(), "start": {"label": start_label,
                                                       "bpb": ctx.result["bpb"].get(start_label, {})},
        "base_bpb": ctx.result["bpb"].get("base", {}), "rows": rows, "fit": fit.model_dump(),
        "set_lines": patch_lines(user_stage, fit.best, batch_searched=bool(sweep.search.global_batch)),
    }
    result["markdown"] = sweep_markdown(result)
    key = sweep.search.mixture.vary[0] if sweep.search.mixture else next(iter(stage.mixture))
    _publish(result, [svg_image(svg, "sweep chart") for svg in scatter_svgs(rows, key)])
    return result


def _publish(result: dict[str, Any], images: list[str]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"sweep-{slug(result['sweep'])}"
    create_markdown_artifact(markdown=sweep_markdown(result, images), key=key,
                             description=f"sweep {result['sweep']} of {result['stage']}: runs, fit, choice")
    table = [{"run": r["run"], "kind": r["kind"], "status": r["status"], "lr": r["lr"],
              "global_batch": r["global_batch"], **{f"w_{k}": v for k, v in r["mixture"].items()},
              **{f"bpb_{k}": v for k, v in r["bpb"].items()}, "objective": r["objective"]}
             for r in result["rows"]]
    create_table_artifact(table=table, key=f"{key}-runs", description=f"sweep {result['sweep']}: every run")


@flow(name="vinasmol", log_prints=True, persist_result=False)
def sweep(
    recipe: str,
    sweep_file: str,
    store: str | None = None,
    stage_runner: str | None = None,
    hub_mirror: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Proxy runs of one recipe stage over the sweep file's search space, the regression's predicted
    best configuration, and check runs of it and of the recipe's values. Returns the runs, the fit,
    the `--set` lines of the choice and a Markdown report (also the artifact `sweep-<name>`)."""
    return run_sweep(recipe, load_sweep(sweep_file), store, stage_runner, hub_mirror, overrides)
