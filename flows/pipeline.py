"""The `vinasmol` flow: the whole pipeline of a recipe, one cached task per step, in phases.

    tokenizer:  fetch-base-model ─► train-tokenizer ─► merge-vocabulary
    data:       prepare-data (main, annealing), with the merged tokenizer
    model:      init-embeddings ─► convert-to-litgpt ─► evaluate (base, init)
    training:   train-stage <stage> ─► evaluate <stage>, for each stage (each its own process)
    then:       export

Step names are those of `vinasmol_core.common.steps.Step`; each is the task function of the same name in
`tasks/` (`prepare-data` is `tasks.data.prepare_data`).

Resume contract: every step's result is persisted in the store's result storage under a key made of
its name, inputs and recipe section (see `tasks.common`). A retry of a failed run (same flow run
id) loads finished steps from there, and the failed training stage continues from its newest
partial checkpoint in the store. `force` / `from_stage` re-run a step and everything after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run

from tasks.common import corpus_digest, result_storage_for, store_root
from tasks.data import prepare_data
from tasks.model import (
    convert_to_litgpt,
    evaluate,
    export,
    fetch_base_model,
    init_embeddings,
    upscale_depth,
)
from tasks.tokenizer import merge_vocabulary, train_tokenizer
from tasks.train import train_stage
from vinasmol_core.common.errors import ConfigError, StoreError
from vinasmol_core.common.manifests import CheckpointManifest, DatasetManifest, TokenizerManifest
from vinasmol_core.common.memory import PeakMemory
from vinasmol_core.common.steps import Step
from vinasmol_core.hub import folder_digest, mirror_dir, mirror_root
from vinasmol_core.plan.hub_revisions import pin_hub_revisions
from vinasmol_core.plan.preflight import require_inputs
from vinasmol_core.plan.recipe import CorpusSpec, HubBase, Recipe, load_recipe
from vinasmol_core.plan.smoke import SMOKE_NAMESPACE, projection_rows, smoke_recipe
from vinasmol_core.store import ArtifactStore, default_store_url
from vinasmol_core.train.loggers import check_logging
from vinasmol_core.train.metrics import MEMORY_KEYS
from vinasmol_core.train.spec import StageSpec

STAGE_RUNNERS = ("inline", "deployment")
# The steps that read hub datasets or models (and so take the run's `hub_mirror`).
HUB_READERS = frozenset(
    str(s) for s in (Step.FETCH_BASE_MODEL, Step.TRAIN_TOKENIZER, Step.MERGE_VOCABULARY, Step.PREPARE_DATA,
                     Step.INIT_EMBEDDINGS, Step.EVALUATE)
)


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
    hub_mirror: str | None = None
    full_recipe: Recipe | None = None
    """For a smoke run, the recipe before it was cut down (what the projection is for)."""

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
    hub_mirror: str | None = None,
    check_inputs: bool = True,
    overrides: list[str] | None = None,
    smoke: bool = False,
) -> RunPlan:
    """Validate the recipe, the stage names, the runner, the store and the recipe's inputs (every
    local file, every hub dataset and model readable: `vinasmol_core.plan.preflight.require_inputs`);
    raise a VinaSmolError naming the problem. Nothing is written except the store's own
    reachability probe.

    `hub_mirror`: a folder in the hub's layout that hub ids are read from (default
    $VINASMOL_HUB_MIRROR; none: the hub itself, or the HF cache under HF_HUB_OFFLINE).

    `force`: re-run each named step and everything after it. `from_stage` alone: the same as
    forcing that step. `from_stage` with `start_ref`: start at that training stage from the
    checkpoint `start_ref` names, skipping the steps before it; nothing is forced, so unchanged
    inputs load from cache (the scheduled annealing run).

    `overrides`: `--set PATH=VALUE` lines applied to the recipe before validation. `smoke`: run the
    recipe cut down by `vinasmol_core.plan.smoke.smoke_recipe`, in the store's `smoke/` namespace."""
    parsed = load_recipe(recipe, overrides)
    full = None
    if smoke:
        full, parsed = parsed, smoke_recipe(parsed)
    runner = stage_runner or parsed.compute.stage_runner
    if runner not in STAGE_RUNNERS:
        raise ConfigError(f"stage_runner: {runner!r} is not one of {', '.join(STAGE_RUNNERS)}")
    if runner == "inline":  # a deployment's stages check it on the training machine
        check_logging(parsed.logging)
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
    mirror = mirror_root(hub_mirror)
    if check_inputs:
        require_inputs(parsed, mirror)
    # a hub corpus at a branch is read and keyed at the commit it points at now
    parsed, _ = pin_hub_revisions(parsed, mirror, strict=check_inputs)
    url = store or parsed.store.url or default_store_url()
    url = store_root(url)
    if smoke:
        url = f"{url}/{SMOKE_NAMESPACE}"
    if check_store:
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
        hub_mirror=str(mirror) if mirror is not None else None,
        full_recipe=full,
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
        self.measured: list[dict[str, Any]] = []
        """One row per step called: wall seconds, peak host memory of this process tree, cached."""

    def _configured(self, task: Any, qualifier: str, rerun: bool | None, kwargs: dict[str, Any]) -> Any:
        run_name = f"{task.name}-{qualifier}" if qualifier else task.name
        forced = task.name in self.plan.forced if rerun is None else rerun
        refresh = forced and run_name not in self.done
        if task.name in HUB_READERS:
            kwargs["hub_mirror"] = self.plan.hub_mirror
        kwargs["store_url"] = self.plan.store_url
        return task.with_options(result_storage=self.storage, refresh_cache=refresh, task_run_name=run_name)

    def __call__(self, task: Any, qualifier: str = "", *, rerun: bool | None = None, **kwargs: Any) -> Any:
        """Run `task` (a step) as the task run `<step>` or `<step>-<qualifier>`. `rerun`: whether
        `force` re-runs it (default: whether the step itself is forced)."""
        configured = self._configured(task, qualifier, rerun, kwargs)
        t0 = time.perf_counter()
        with PeakMemory() as peak:
            state = configured(return_state=True, **kwargs)
        self.measured.append({"step": configured.task_run_name, "seconds": time.perf_counter() - t0,
                              "peak_host_mb": peak.bytes / 2**20, "cached": state.name == "Cached"})
        return state.result()

    def submit(self, task: Any, qualifier: str = "", **kwargs: Any) -> Any:
        """Start `task` as `__call__` would, on the flow's task runner; its future."""
        return self._configured(task, qualifier, None, kwargs).submit(**kwargs)


def _sha(manifest: Any, path: str = "tokenizer.json") -> str:
    entry = manifest.files.get(path)
    return entry.sha256 if entry is not None else ""


@dataclass
class _Run:
    """What the phases of one pipeline run share: the plan, the step runner, the store, the corpora
    and the result being built."""

    plan: RunPlan
    run: _Runner
    store: ArtifactStore
    flow_run_id: str | None
    digests: dict[str, str]
    result: dict[str, Any]
    tokenizer: TokenizerManifest | None = None

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe

    @property
    def refs(self) -> str:
        return f"runs/{self.recipe.name}"

    @property
    def main_corpora(self) -> list[CorpusSpec]:
        return self.recipe.corpora_with_role("main")

    def digests_of(self, corpora: list[CorpusSpec]) -> dict[str, str]:
        return {c.name: self.digests[c.name] for c in corpora}

    def evaluate(self, checkpoint: str, label: str, producer: str) -> None:
        """Evaluate a checkpoint (re-run when its producer is forced) and record its bits per byte,
        and its long-context and harness results where the recipe asks for them."""
        section = self.recipe.eval.for_label(label)
        include = section.harness.include_path if section.harness.after else None
        if include and not Path(include).is_dir():
            raise ConfigError(f"eval.harness.include_path: {include} is not a folder")
        report = self.run(
            evaluate,
            label,
            rerun=self.plan.refresh_evaluation(producer),
            checkpoint=checkpoint,
            label=label,
            section=section,
            eval_corpora=self.main_corpora,
            val_fraction=self.recipe.data.val_fraction,
            include_digest=folder_digest(Path(include)) if include else "",
        )
        self.result["bpb"][label] = report.metrics.get("bpb", {})
        for key in ("long", "harness"):
            if key in report.metrics:
                self.result[key][label] = report.metrics[key]


def _open_run(plan: RunPlan) -> _Run:
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    recipe = plan.recipe
    result: dict[str, Any] = {
        "recipe": recipe.name,
        "store": plan.store_url,
        "run": flow_run_id,
        "bpb": {},
        "long": {},
        "harness": {},
        "checkpoints": [],
        "fertility_markdown": "",
    }
    return _Run(
        plan=plan,
        run=_Runner(plan, flow_run_id),
        store=ArtifactStore(plan.store_url),
        flow_run_id=flow_run_id,
        digests={c.name: corpus_digest(c, plan.hub_mirror) for c in recipe.corpora},
        result=result,
    )


def _base_digest(recipe: Recipe, hub_mirror: str | None) -> str:
    """What a hub base model read from a mirror depends on: the mirror folder's content."""
    source = recipe.base_model.source
    if isinstance(source, HubBase) and hub_mirror:
        return folder_digest(mirror_dir(Path(hub_mirror), source.repo))
    return ""


def _tokenizer_phase(ctx: _Run) -> tuple[CheckpointManifest, TokenizerManifest]:
    """fetch-base-model, train-tokenizer, merge-vocabulary; the base model and the merged tokenizer."""
    recipe = ctx.recipe
    base = ctx.run(fetch_base_model, source=recipe.base_model.source, name=recipe.base_model.name,
                   source_digest=_base_digest(recipe, ctx.plan.hub_mirror))
    tok_corpora = [c for c in ctx.main_corpora if c.lang in recipe.tokenizer.train_languages]
    counts = ctx.run(
        train_tokenizer,
        base_model=base.digest,
        corpora=tok_corpora,
        corpus_digests=ctx.digests_of(tok_corpora),
        section=recipe.tokenizer,
        val_fraction=recipe.data.val_fraction,
    )
    tokenizer = ctx.run(
        merge_vocabulary,
        base_model=base.digest,
        word_counts=counts.digest,
        section=recipe.tokenizer,
        eval_corpora=ctx.main_corpora,
        val_fraction=recipe.data.val_fraction,
    )
    ctx.tokenizer = tokenizer
    ctx.result["fertility_markdown"] = tokenizer.fertility_markdown
    ctx.store.set_ref(f"{ctx.refs}/tokenizer", tokenizer.digest)
    return base, tokenizer


def _start_tokenizer(ctx: _Run, start_ref: str) -> tuple[str, str]:
    """The artifact carrying the tokenizer of a run that starts at `start_ref`, and its sha256."""
    start = ctx.store.get_manifest(start_ref)
    sha = _sha(start)
    if not sha:
        raise StoreError(f"start_ref {start_ref!r}: the checkpoint carries no tokenizer.json")
    return start.digest, sha


def _data_phase(
    ctx: _Run, tok_artifact: str, tok_sha: str, stages: list[StageSpec] | None = None
) -> dict[str, DatasetManifest]:
    """prepare-data for each dataset the remaining stages (or `stages`) read (`main`, `annealing`)."""
    recipe = ctx.recipe
    stages = recipe.stages[ctx.plan.start_stage :] if stages is None else stages
    datasets: dict[str, DatasetManifest] = {}
    for role in sorted({recipe.stage_dataset(s) for s in stages}):
        extra = recipe.corpora_with_role("annealing") if role == "annealing" else []
        members = ctx.main_corpora + extra
        datasets[role] = ctx.run(
            prepare_data,
            role,
            role=role,
            corpora=members,
            corpus_digests=ctx.digests_of(members),
            section=recipe.data,
            tokenizer_sha=tok_sha,
            tokenizer_artifact=tok_artifact,
        )
    ctx.result["datasets"] = {role: manifest.digest for role, manifest in datasets.items()}
    ctx.result["data_sources"] = [
        {"role": role, "source": name, "planned_tokens": stats.get("planned_tokens"),
         "train_tokens": stats.get("train_tokens", 0), "read_mb": stats.get("bytes_read", 0) / 1e6}
        for role, manifest in datasets.items() for name, stats in sorted(manifest.stats.items())
    ]
    return datasets


def _model_phase(ctx: _Run, base: CheckpointManifest, tokenizer: TokenizerManifest) -> str:
    """init-embeddings, convert-to-litgpt (then upscale-depth when the recipe has `upscale`), and the
    evaluation of the base, initial (and up-scaled) models; returns the litgpt checkpoint the first
    stage starts from."""
    recipe = ctx.recipe
    section = recipe.embedding_init
    text: dict[str, Any] = {}
    if section.method == "distill":  # the training text the new rows are distilled on
        members = [c for c in ctx.main_corpora if c.lang in section.distill.languages]
        text = {"corpora": members, "corpus_digests": ctx.digests_of(members),
                "val_fraction": recipe.data.val_fraction}
    extended = ctx.run(
        init_embeddings, base_model=base.digest, tokenizer=tokenizer.digest, section=section, **text
    )
    converted = ctx.run(
        convert_to_litgpt, hf_model=extended.digest, litgpt_name=recipe.base_model.litgpt_name
    )
    ctx.evaluate(base.digest, "base", Step.FETCH_BASE_MODEL)
    ctx.evaluate(converted.digest, "init", Step.CONVERT_TO_LITGPT)
    if recipe.upscale is None:
        return converted.digest
    upscaled = ctx.run(upscale_depth, checkpoint=converted.digest, section=recipe.upscale)
    ctx.evaluate(upscaled.digest, "upscaled", Step.UPSCALE_DEPTH)
    return upscaled.digest


def with_base_vocab(ctx: _Run, spec: StageSpec) -> StageSpec:
    """A new-embeddings stage told the base vocabulary size of the run's merged tokenizer."""
    if spec.trainable == "new-embeddings" and spec.base_vocab_size is None and ctx.tokenizer is not None:
        return spec.model_copy(update={"base_vocab_size": ctx.tokenizer.base_vocab_size})
    return spec


def _training_phase(
    ctx: _Run, previous: str, datasets: dict[str, DatasetManifest], stop: int | None = None
) -> tuple[str, list[tuple[str, list[dict[str, Any]]]]]:
    """train-stage and evaluate for each remaining stage (up to index `stop`), each from the previous
    one's checkpoint; returns the last checkpoint and each stage's metrics."""
    recipe, plan = ctx.recipe, ctx.plan
    stage_events: list[tuple[str, list[dict[str, Any]]]] = []
    for spec in recipe.stages[plan.start_stage : stop]:
        spec = with_base_vocab(ctx, spec)
        forced = spec.name in plan.forced
        trained = ctx.run(
            train_stage,
            spec.name,
            rerun=forced,
            spec=spec,
            init_checkpoint=previous,
            dataset=datasets[recipe.stage_dataset(spec)].digest,
            stage_runner=plan.stage_runner,
            partial_suffix=f"-{ctx.flow_run_id[:8]}" if forced and ctx.flow_run_id else "",
            logging=recipe.logging,
        )
        checkpoint = trained.checkpoint
        previous = checkpoint.digest
        ref = f"{ctx.refs}/{spec.name}"
        ctx.store.set_ref(ref, previous)
        ctx.result["checkpoints"].append(
            {"stage": spec.name, "step": checkpoint.step, "ref": ref, "digest": previous,
             "metrics": {k: v for k, v in checkpoint.metrics.items() if isinstance(v, (int, float, str))},
             "mixture": checkpoint.extra.get("mixture", {}),
             "mixture_warnings": checkpoint.extra.get("mixture_warnings", []),
             "memory": {k: checkpoint.metrics[k] for k in MEMORY_KEYS if k in checkpoint.metrics}}
        )
        stage_events.append((spec.name, trained.events))
        ctx.evaluate(previous, spec.name, spec.name)
        get_run_logger().info("stage %s: checkpoint %s (step %s)", spec.name, previous[:12], checkpoint.step)
    return previous, stage_events


def _export_phase(ctx: _Run, final: str) -> None:
    """export the final checkpoint; move the run's refs."""
    exported = ctx.run(export, checkpoint=final, section=ctx.recipe.export)
    ctx.store.set_ref(f"{ctx.refs}/export", exported.digest)
    ctx.store.set_ref(f"latest/{ctx.recipe.name}/export", exported.digest)
    stages = ctx.recipe.stages[ctx.plan.start_stage :]
    final_ref = f"{ctx.refs}/{stages[-1].name}" if stages else ""
    ctx.result["final_checkpoint"] = {"ref": final_ref, "digest": final}
    ctx.result["export"] = {"ref": f"{ctx.refs}/export", "digest": exported.digest}


def run_pipeline(plan: RunPlan) -> dict[str, Any]:
    """The flow's body (inside a flow run): the phases in order, then the run's report artifacts."""
    from flows.report import publish_artifacts, summary_markdown

    ctx = _open_run(plan)
    if plan.start_ref is None:
        base, tokenizer = _tokenizer_phase(ctx)
        datasets = _data_phase(ctx, tokenizer.digest, _sha(tokenizer))
        previous = _model_phase(ctx, base, tokenizer)
    else:  # a run that starts at a training stage, from the checkpoint start_ref names
        datasets = _data_phase(ctx, *_start_tokenizer(ctx, plan.start_ref))
        previous = ctx.store.resolve(plan.start_ref)
    final, stage_events = _training_phase(ctx, previous, datasets)
    _export_phase(ctx, final)
    ctx.result["steps"] = ctx.run.measured
    if plan.full_recipe is not None:
        measured = {row["stage"]: row["metrics"] for row in ctx.result["checkpoints"]}
        ctx.result["projection"] = projection_rows(plan.full_recipe, measured)
    publish_artifacts(ctx.result, stage_events)
    ctx.result["summary_markdown"] = summary_markdown(ctx.result)
    return ctx.result


@flow(name="vinasmol", log_prints=True, persist_result=False)
def vinasmol(
    recipe: str,
    store: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    start_ref: str | None = None,
    stage_runner: str | None = None,
    hub_mirror: str | None = None,
    overrides: list[str] | None = None,
    smoke: bool = False,
) -> dict[str, Any]:
    """Run a recipe end to end (see the module docstring). Returns refs and digests of the final
    checkpoint and of the HF export, the evaluation table and the summary Markdown.

    `overrides`: `--set PATH=VALUE` lines for the recipe. `smoke`: every step on a small slice, in
    the store's `smoke/` namespace, with a projection of the full run (`vinasmol_core.plan.smoke`).

    `stage_runner`: "inline" (each stage a local process) or "deployment" (each stage a child run
    of the training deployment, `tasks.dispatch.run_stage_deployment`); default: the recipe's
    `compute.stage_runner`, itself "inline" unless set. `hub_mirror`: a folder in the hub's layout
    that hub datasets and models are read from (default $VINASMOL_HUB_MIRROR).

    Every input is checked before the first step: a missing file or an unreachable hub source ends
    the run with one message saying how to fix it."""
    plan = plan_run(recipe, store, from_stage, force, start_ref, stage_runner, hub_mirror=hub_mirror,
                    overrides=overrides, smoke=smoke)
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
