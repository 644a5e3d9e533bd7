"""The `vinasmol` flow: the whole pipeline of a recipe, one cached task per step.

    base-model ─┐
    tokenizer ──┴─► merge-vocabulary ─► data (main, annealing) ─► embeddings ─► convert
        ─► train <stage> ... (each its own process) ─► evaluate (per checkpoint) ─► export

Resume contract: every step's result is persisted in the store's result storage under a key made of
its name, inputs and recipe section (see `tasks.common`). A retry of a failed run (same flow run
id) loads finished steps from there, and the failed training stage continues from its newest
partial checkpoint in the store. `force` / `from_stage` re-run a step and everything after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run

from tasks import pipeline as steps
from tasks.common import result_storage_for, store_root
from vinasmol_core.errors import ConfigError, StoreError
from vinasmol_core.recipe import Recipe, load_recipe
from vinasmol_core.store import default_store_url

STAGE_RUNNERS = ("inline", "deployment")


@dataclass
class RunPlan:
    """A validated request: everything is checked before any step runs."""

    recipe: Recipe
    recipe_path: str
    store_url: str
    forced: set[str] = field(default_factory=set)
    start_ref: str | None = None
    start_stage: int = 0
    stage_runner: str = "inline"
    explicit: set[str] = field(default_factory=set)

    def refresh_evaluation(self, producer: str) -> bool:
        """Re-evaluate a checkpoint when its producer is forced, or when `evaluate` itself is named."""
        return producer in self.forced or "evaluate" in self.explicit


def plan_run(
    recipe: str | Path,
    store: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    start_ref: str | None = None,
    stage_runner: str | None = None,
    check_store: bool = True,
) -> RunPlan:
    """Validate the recipe, the stage names, the runner and the store; raise a VinaSmolError naming
    the problem. Nothing is written except the store's own reachability probe.

    `force`: re-run each named step and everything after it. `from_stage` alone: the same as
    forcing that step. `from_stage` with `start_ref`: start at that training stage from the
    checkpoint `start_ref` names, skipping the steps before it; nothing is forced, so unchanged
    inputs load from cache (the scheduled annealing run)."""
    parsed = load_recipe(recipe)
    runner = stage_runner or parsed.compute.stage_runner
    if runner not in STAGE_RUNNERS:
        raise ConfigError(f"stage_runner: {runner!r} is not one of {', '.join(STAGE_RUNNERS)}")
    forced: set[str] = set()
    if from_stage and not start_ref:
        # With start_ref, from_stage only says where the run starts (scheduled annealing): an
        # unchanged input must hit the cache. Use `force` to re-run it anyway.
        forced |= parsed.steps_from([from_stage])
    for name in force or []:
        forced |= parsed.steps_from([name])
    start_index = 0
    if start_ref:
        stage_names = [s.name for s in parsed.stages]
        if not from_stage or from_stage not in stage_names:
            raise ConfigError(
                "start_ref needs from_stage naming the training stage that starts from it "
                f"(one of: {', '.join(stage_names)})"
            )
        start_index = stage_names.index(from_stage)
    url = store or parsed.store.url or default_store_url()
    url = store_root(url)
    if check_store:
        from vinasmol_core.store import ArtifactStore

        art = ArtifactStore(url)
        art.check_reachable()
        if start_ref and not art.exists(start_ref):
            raise StoreError(f"start_ref {start_ref!r} names nothing in the store {url}")
    return RunPlan(
        recipe=parsed,
        recipe_path=str(recipe),
        store_url=url,
        forced=forced,
        start_ref=start_ref,
        start_stage=start_index,
        stage_runner=runner,
        explicit=set(force or []) | ({from_stage} if from_stage else set()),
    )


def _done_in_this_run(flow_run_id: str | None) -> set[str]:
    """Task run names already Completed in this flow run (a retry must not redo forced steps)."""
    if not flow_run_id:
        return set()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name for r in runs if r.state is not None and r.state.is_completed()}


class _Runner:
    """Calls steps with the run's result storage, naming each task run and applying `force`."""

    def __init__(self, plan: RunPlan, flow_run_id: str | None) -> None:
        self.plan = plan
        self.storage = result_storage_for(plan.store_url)
        self.done = _done_in_this_run(flow_run_id) if plan.forced else set()

    def __call__(self, task: Any, step_name: str, run_name: str, **kwargs: Any) -> Any:
        if step_name.startswith("evaluate:"):
            forced = self.plan.refresh_evaluation(step_name.partition(":")[2])
        else:
            forced = step_name in self.plan.forced
        refresh = forced and run_name not in self.done
        configured = task.with_options(
            result_storage=self.storage, refresh_cache=refresh, task_run_name=run_name
        )
        return configured(store_url=self.plan.store_url, **kwargs)


def _sha(manifest: Any, path: str = "tokenizer.json") -> str:
    entry = manifest.files.get(path)
    return entry.sha256 if entry is not None else ""


def run_pipeline(plan: RunPlan) -> dict[str, Any]:
    """The flow's body (inside a flow run)."""
    from vinasmol_core.store import ArtifactStore

    logger = get_run_logger()
    recipe = plan.recipe
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    run = _Runner(plan, flow_run_id)
    store = ArtifactStore(plan.store_url)
    corpora = recipe.section("corpora")
    digests = {c["name"]: steps.corpus_digest(c) for c in corpora}
    main_corpora = [c for c in corpora if c["role"] == "main"]
    tok_corpora = [c for c in main_corpora if c["lang"] in recipe.tokenizer.train_languages]
    eval_section = recipe.section("eval")
    result: dict[str, Any] = {
        "recipe": recipe.name,
        "store": plan.store_url,
        "run": flow_run_id,
        "bpb": {},
        "checkpoints": [],
        "fertility_markdown": "",
    }
    refs = f"runs/{recipe.name}"

    tokenizer = None
    if plan.start_ref is None:
        base = run(
            steps.fetch_base_model,
            "base-model",
            "base-model",
            source=recipe.base_model.source.model_dump(mode="json"),
            name=recipe.base_model.name,
        )
        counts = run(
            steps.train_tokenizer,
            "tokenizer",
            "tokenizer",
            base_model=base.digest,
            corpora=tok_corpora,
            corpus_digests={c["name"]: digests[c["name"]] for c in tok_corpora},
            section=recipe.section("tokenizer"),
        )
        tokenizer = run(
            steps.merge_vocabulary,
            "merge-vocabulary",
            "merge-vocabulary",
            base_model=base.digest,
            word_counts=counts.digest,
            section=recipe.section("tokenizer"),
            eval_corpora=main_corpora,
        )
        result["fertility_markdown"] = tokenizer.fertility_markdown
        store.set_ref(f"{refs}/tokenizer", tokenizer.digest)
        tok_artifact, tok_sha = tokenizer.digest, _sha(tokenizer)
    else:
        start = store.get_manifest(plan.start_ref)
        tok_artifact, tok_sha = start.digest, _sha(start)
        if not tok_sha:
            raise StoreError(f"start_ref {plan.start_ref!r}: the checkpoint carries no tokenizer.json")

    stages = recipe.stages[plan.start_stage :]
    datasets: dict[str, Any] = {}
    for role in sorted({recipe.stage_dataset(s) for s in stages}):
        extra = [c for c in corpora if c["role"] == "annealing"] if role == "annealing" else []
        members = main_corpora + extra
        datasets[role] = run(
            steps.prepare_data,
            "data",
            f"data-{role}",
            role=role,
            corpora=members,
            corpus_digests={c["name"]: digests[c["name"]] for c in members},
            section=recipe.section("data"),
            tokenizer_sha=tok_sha,
            tokenizer_artifact=tok_artifact,
        )

    result["datasets"] = {role: manifest.digest for role, manifest in datasets.items()}

    if plan.start_ref is None:
        extended = run(
            steps.init_embeddings,
            "embeddings",
            "embeddings",
            base_model=base.digest,
            tokenizer=tokenizer.digest,
            section=recipe.section("embedding_init"),
        )
        converted = run(
            steps.convert_to_litgpt,
            "convert",
            "convert",
            hf_model=extended.digest,
            litgpt_name=recipe.base_model.litgpt_name,
        )
        previous = converted.digest
        for label, producer, digest in (
            ("base", "base-model", base.digest),
            ("init", "convert", converted.digest),
        ):
            report = run(
                steps.evaluate,
                f"evaluate:{producer}",
                f"evaluate-{label}",
                checkpoint=digest,
                label=label,
                section=eval_section,
                eval_corpora=main_corpora,
            )
            result["bpb"][label] = report.metrics.get("bpb", {})
    else:
        previous = store.resolve(plan.start_ref)

    stage_events: list[tuple[str, list[dict[str, Any]]]] = []
    for spec in stages:
        if spec.trainable == "new-embeddings" and spec.base_vocab_size is None and tokenizer is not None:
            spec = spec.model_copy(update={"base_vocab_size": tokenizer.base_vocab_size})
        forced = spec.name in plan.forced
        trained = run(
            steps.train_stage,
            spec.name,
            f"train-{spec.name}",
            spec=spec,
            init_checkpoint=previous,
            dataset=datasets[recipe.stage_dataset(spec)].digest,
            stage_runner=plan.stage_runner,
            partial_suffix=f"-{flow_run_id[:8]}" if forced and flow_run_id else "",
        )
        checkpoint = trained.checkpoint
        previous = checkpoint.digest
        store.set_ref(f"{refs}/{spec.name}", previous)
        result["checkpoints"].append(
            {"stage": spec.name, "step": checkpoint.step, "ref": f"{refs}/{spec.name}", "digest": previous}
        )
        stage_events.append((spec.name, trained.events))
        report = run(
            steps.evaluate,
            f"evaluate:{spec.name}",
            f"evaluate-{spec.name}",
            checkpoint=previous,
            label=spec.name,
            section=eval_section,
            eval_corpora=main_corpora,
        )
        result["bpb"][spec.name] = report.metrics.get("bpb", {})
        logger.info("stage %s: checkpoint %s (step %s)", spec.name, previous[:12], checkpoint.step)

    exported = run(steps.export, "export", "export", checkpoint=previous, section=recipe.section("export"))
    store.set_ref(f"{refs}/export", exported.digest)
    store.set_ref(f"latest/{recipe.name}/export", exported.digest)
    result["final_checkpoint"] = {"ref": f"{refs}/{stages[-1].name}" if stages else "", "digest": previous}
    result["export"] = {"ref": f"{refs}/export", "digest": exported.digest}

    from flows.report import publish_artifacts, summary_markdown

    publish_artifacts(result, stage_events)
    result["summary_markdown"] = summary_markdown(result)
    return result


@flow(name="vinasmol", log_prints=True, persist_result=False)
def vinasmol(
    recipe: str,
    store: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    start_ref: str | None = None,
    stage_runner: str | None = None,
) -> dict[str, Any]:
    """Run a recipe end to end (see the module docstring). Returns refs and digests of the final
    checkpoint and of the HF export, the evaluation table and the summary Markdown.

    `stage_runner`: "inline" (each stage a local process) or "deployment" (each stage a child run
    of the training deployment, `flows.remote.run_stage_deployment`); default: the recipe's
    `compute.stage_runner`, itself "inline" unless set."""
    plan = plan_run(recipe, store, from_stage, force, start_ref, stage_runner)
    return run_pipeline(plan)


def retry_flow_run(flow_run_id: str) -> Any:
    """Re-run a finished flow run of `vinasmol` in this process under the same id (what
    `prefect flow-run retry ID --entrypoint flows/pipeline.py:vinasmol` does). Returns the final state."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message="retry"), force=True)
        flow_run = client.read_flow_run(flow_run_id)
    return run_flow(
        flow=vinasmol, flow_run=flow_run, parameters=dict(flow_run.parameters), return_type="state"
    )
