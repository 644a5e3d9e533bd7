"""Stage dispatch: one training stage as a child flow run of the training-stage deployment (on the
CUDA pool), instead of a process of the calling run.

`run_stage_deployment(job)` is what the `train-stage` step (`tasks.train.train_stage`) calls when
`stage_runner="deployment"`.
It starts the `vinasmol-stage` deployment with an idempotency key, mirrors the child's progress and
its curves artifact (`curves-<stage>`) into the calling run, and retries a failed child itself:

* A parent retry (the UI's "Retry") re-enters the pipeline under the same run id, so the same keys are
  asked for again. `run_deployment` with a key it has seen returns that same child, even a failed one.
  Each attempt therefore gets its own key (`<key>/attempt-<n>`): attempts that already exist are
  looked at in order (a completed one is reused, a running one is waited for, a failed one is
  skipped), and a failed attempt leads to a new key.
* Only attempts started by this parent attempt count against `max_attempts`, so a UI retry always
  gets fresh attempts; the new child resumes from the stage's newest partial checkpoint in the store.
* The fault-injection knob `fail_at_step` is a debugging aid that applies to the first attempt only,
  so that retries can be exercised end to end.

The child's output is read back from the store (`job.out_ref`), not from a Prefect result, so the
parent and the child may run on different machines.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterIdempotencyKey,
)
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.deployments import run_deployment

from vinasmol_core.common.errors import VinaSmolError

DEFAULT_STAGE_DEPLOYMENT = "vinasmol-stage/train-stage"
DEFAULT_MAX_ATTEMPTS = 2


def stage_deployment_name() -> str:
    """The training-stage deployment: $VINASMOL_STAGE_DEPLOYMENT or `vinasmol-stage/train-stage`."""
    return os.environ.get("VINASMOL_STAGE_DEPLOYMENT", DEFAULT_STAGE_DEPLOYMENT)


def _stage_name(job: Any) -> str:
    spec = getattr(job, "spec", None)
    for attr in ("name", "stage"):
        value = getattr(spec, attr, None)
        if isinstance(value, str) and value:
            return value
    return "stage"


def _job_payload(job: Any, attempt: int) -> dict[str, Any]:
    """The child's `job` parameter: JSON only; fault injection on the first attempt only."""
    data = job.model_dump(mode="json") if hasattr(job, "model_dump") else dict(job)
    if attempt > 1 and "fail_at_step" in data:
        data["fail_at_step"] = None
    return data


def _devices(job: Any) -> int:
    """GPUs for the child run's pod: the stage's devices; none for a stage on several nodes, whose run
    only creates and watches its JobSet (the JobSet's pods ask for the GPUs)."""
    spec = getattr(job, "spec", None)
    if isinstance(getattr(spec, "nodes", 1), int) and spec.nodes > 1:
        return 0
    for attr in ("devices", "num_devices", "gpus"):
        value = getattr(spec, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _parent_run() -> tuple[UUID | None, datetime | None]:
    """The calling flow run's id and the start of its current attempt (None outside a run)."""
    ctx = FlowRunContext.get()
    run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
    if run_id is None:
        tctx = TaskRunContext.get()
        run_id = tctx.task_run.flow_run_id if tctx else None
    if run_id is None:
        return None, None
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return run_id, state.timestamp if state else None


def _job_variables(deployment: str, devices: int) -> dict[str, Any]:
    """Ask for `devices` GPUs where the deployment's pool has a GPU-count variable (Kubernetes, Docker)."""
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        if not dep.work_pool_name:
            return {}
        pool = client.read_work_pool(dep.work_pool_name)
    props = (pool.base_job_template or {}).get("variables", {}).get("properties", {})
    return {"gpu_count": devices} if "gpu_count" in props else {}


def _existing_child(key: str, deployment_id: UUID) -> FlowRun | None:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key]))
        )
    runs = [r for r in runs if r.deployment_id == deployment_id]
    return runs[0] if runs else None


class _ProgressMirror:
    """Re-publishes the child's progress artifact in the calling run and links the child's page."""

    def __init__(self, stage: str, enabled: bool) -> None:
        self.stage = stage
        self.enabled = enabled
        self.artifact_id: UUID | None = None
        self.last: float | None = None
        self.curves_id: UUID | None = None  # the child's newest curves version copied here

    def start(self, child: FlowRun) -> None:
        if not self.enabled:
            return
        ui = os.environ.get("PREFECT_UI_URL") or ""
        link = f"{ui.rstrip('/')}/runs/flow-run/{child.id}" if ui else f"flow-run:{child.id}"
        create_link_artifact(
            link=link,
            link_text=child.name,
            description=f"Training stage `{self.stage}` runs as child flow run `{child.name}`.",
        )
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=0.0, description=f"stage {self.stage}: progress of the training child run"
            )

    def update(self, child_id: UUID) -> None:
        if not self.enabled or self.artifact_id is None:
            return
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child_id]))
            )
        self._copy_curves(arts)
        progress = [a for a in arts if a.type == "progress" and isinstance(a.data, int | float)]
        if not progress:
            return
        newest = max(progress, key=lambda a: a.updated or a.created)
        value = float(newest.data)
        if value != self.last:
            update_progress_artifact(self.artifact_id, value)
            self.last = value

    def _copy_curves(self, arts: list[Any]) -> None:
        """The child's newest version of its curves artifact, as a new version in the calling run."""
        curves = [a for a in arts if a.type == "markdown" and (a.key or "").startswith("curves-")]
        if not curves:
            return
        newest = max(curves, key=lambda a: a.created)
        if newest.id != self.curves_id:
            create_markdown_artifact(
                markdown=str(newest.data), key=newest.key, description=f"{newest.description or ''} "
                "(from the training child run)".strip(),
            )
            self.curves_id = newest.id

    def finish(self, child_id: UUID) -> None:
        """Copy the child's metrics tables into the calling run (keys prefixed with `child-`)."""
        if not self.enabled:
            return
        from prefect.artifacts import create_table_artifact

        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child_id]))
            )
        self._copy_curves(arts)
        for art in arts:
            if art.type == "table" and art.data:
                data = json.loads(art.data) if isinstance(art.data, str) else art.data
                create_table_artifact(
                    table=data,
                    key=f"child-{art.key}" if art.key else None,
                    description=f"{art.description or ''} (from the training child run)".strip(),
                )
        if self.artifact_id is not None and self.last != 100.0:
            update_progress_artifact(self.artifact_id, 100.0)


def _wait(child: FlowRun, poll_seconds: float, mirror: _ProgressMirror) -> FlowRun:
    with get_client(sync_client=True) as client:
        while True:
            child = client.read_flow_run(child.id)
            mirror.update(child.id)
            if child.state is not None and child.state.is_final():
                return child
            time.sleep(poll_seconds)


def run_stage_deployment(
    job: Any,
    *,
    key: str | None = None,
    deployment: str | None = None,
    max_attempts: int | None = None,
    poll_seconds: float = 2.0,
) -> Any:
    """Run `job` (a StageJob) as a child run of the training deployment; return its CheckpointManifest.

    `key` identifies the stage within the calling run (default: `<parent run id>/<stage>`).
    `max_attempts` (default $VINASMOL_STAGE_ATTEMPTS or 2) bounds the children started by this parent
    attempt. Raises VinaSmolError naming the stage and the last child run when all attempts fail.
    """
    from vinasmol_core.store import ArtifactStore

    logger = get_run_logger()
    deployment = deployment or stage_deployment_name()
    attempts_allowed = max_attempts or int(os.environ.get("VINASMOL_STAGE_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))
    stage = _stage_name(job)
    parent_id, attempt_started = _parent_run()
    if key is None:
        key = f"{parent_id or 'adhoc'}/{stage}"
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
    job_variables = _job_variables(deployment, _devices(job))
    mirror = _ProgressMirror(stage, enabled=parent_id is not None)

    started_here = 0
    attempt = 0
    last: FlowRun | None = None
    while True:
        attempt += 1
        attempt_key = f"{key}/attempt-{attempt}"
        existing = _existing_child(attempt_key, dep.id)
        reused = existing is not None and (
            attempt_started is None or existing.created is None or existing.created < attempt_started
        )
        if existing is not None and existing.state is not None and existing.state.is_final():
            if not existing.state.is_completed() and reused:
                logger.info("stage %s: attempt %d (%s) already %s; next attempt",
                            stage, attempt, existing.name, existing.state.name)
                last = existing
                continue
        if existing is None:
            if started_here >= attempts_allowed:
                break
            started_here += 1
        child = run_deployment(
            deployment,
            parameters={"job": _job_payload(job, attempt)},
            flow_run_name=f"{stage}-attempt-{attempt}",
            idempotency_key=attempt_key,
            timeout=0,
            tags=["vinasmol", f"stage:{stage}"],
            job_variables=job_variables or None,
        )
        logger.info("stage %s: attempt %d is child run %s (%s)", stage, attempt, child.name, child.id)
        mirror.start(child)
        child = _wait(child, poll_seconds, mirror)
        last = child
        if child.state is not None and child.state.is_completed():
            mirror.finish(child.id)
            store = ArtifactStore(getattr(job, "store_url", None))
            manifest = store.get_manifest(job.out_ref)
            logger.info("stage %s: child run %s completed; checkpoint %s", stage, child.name, manifest.digest)
            return manifest
        message = child.state.message if child.state else "no state"
        logger.warning("stage %s: child run %s ended %s: %s", stage, child.name,
                       child.state.name if child.state else "?", message)
        if started_here >= attempts_allowed:
            break
    name = last.name if last else "none"
    raise VinaSmolError(
        f"training stage {stage!r} failed in {started_here} child run(s) of {deployment} "
        f"(last: {name}); retry the run to resume from the stage's newest partial checkpoint"
    )
