"""The training step, one cached Prefect task: `train_stage` ("train-stage") trains one recipe stage
(a `StageSpec`) in a process of its own (`vinasmol_core.train.run_stage_process`, torchrun for
several devices), here ("inline") or as a child run of the training-stage deployment
(`tasks.dispatch.run_stage_deployment`), and resumes from the stage's newest partial checkpoint.

`run_stage_job` is what both runners execute: the stage process, its metrics turned into a progress
artifact, the keyed curves artifact (`tasks.curves`) and log lines by `StageProgress`. `logging` (the
recipe's section: artifact interval, CSV, TensorBoard, W&B) is in no cache key.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pydantic import BaseModel, Field

from tasks.common import run_logger, slug, step
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.common.steps import Step
from vinasmol_core.train.spec import StageJob, StageLogging, StageSpec

FAIL_AT_ENV = "VINASMOL_FAIL_AT"  # "<stage>:<step>": debugging, never part of a cache key
MULTINODE_ENV = "VINASMOL_MULTINODE"  # "local" (torchrun agents on this machine) or "jobset"


class TrainedStage(BaseModel):
    """A training stage's result: its final checkpoint manifest and the metrics it streamed."""

    checkpoint: CheckpointManifest
    events: list[dict[str, Any]] = Field(default_factory=list)
    duration_s: float = 0.0


class StageProgress:
    """A stage's metrics callback: moves the progress artifact `progress-<stage>` (at most once a
    second, and to 100 at the end), publishes a new version of the curves artifact `curves-<stage>`
    at each multiple of `curves_interval` optimizer steps and at the end, logs steps, evaluations and
    resumes, and keeps the events (a resumed stage's replayed history first)."""

    def __init__(self, stage: str, total_steps: int, curves_interval: int = 50) -> None:
        from prefect.artifacts import create_progress_artifact

        self.stage = stage
        self.total = max(total_steps, 1)
        self.curves_interval = max(curves_interval, 1)
        self.curves_step = 0  # the step of the newest curves version
        self.events: list[dict[str, Any]] = []
        self.last_push = 0.0
        self.last_value = -1.0
        self.lock = threading.Lock()
        self.logger = run_logger()
        try:
            self.artifact_id = create_progress_artifact(
                progress=0.0, key=f"progress-{slug(stage)}", description=f"training stage {stage}"
            )
        except Exception:  # progress is best effort, never the reason a stage fails
            self.artifact_id = None

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            if event.get("event") == "history":
                self.events.extend(event.get("events", []))
                self.curves_step = max((e.get("step", 0) for e in event.get("events", [])), default=0)
                self.logger.info("%s: %d earlier events restored", self.stage, len(event.get("events", [])))
            else:
                self.events.append(event)
            self._log(event)
            step_no = event.get("step")
            every = self.curves_interval
            if event.get("event") == "step" and isinstance(step_no, int) and (
                step_no // every > self.curves_step // every  # passed a multiple of the interval
            ):
                self.publish_curves("running")
            if not isinstance(step_no, int) or self.artifact_id is None:
                return
            value = min(100.0, 100.0 * step_no / self.total)
            now = time.monotonic()
            if value > self.last_value and (now - self.last_push > 1.0 or value >= 100.0):
                self._push(value)

    def _log(self, event: dict[str, Any]) -> None:
        kind, name = event.get("event"), self.stage
        if kind == "step":
            self.logger.info("%s step %s/%d loss %s lr %s %s tok/s", name, event.get("step"), self.total,
                             event.get("loss"), event.get("lr"), event.get("tokens_per_s"))
        elif kind == "eval":
            self.logger.info("%s eval @ %s: loss %s bpb %s", name, event.get("step"),
                             event.get("val_loss"), event.get("val_bpb"))
        elif kind == "start" and event.get("resumed_from"):
            self.logger.info("%s resumed from step %s", name, event["resumed_from"])
        if kind == "start" and event.get("log_dir"):
            self.logger.info("%s: CSV and TensorBoard logs in %s (tensorboard --logdir %s)",
                             name, event["log_dir"], event["log_dir"])

    def publish_curves(self, state: str) -> None:
        """A new version of `curves-<stage>`: charts, latest metrics, evaluations (best effort)."""
        from prefect.artifacts import create_markdown_artifact

        from tasks.curves import curves_key, stage_curves_markdown

        steps = [e.get("step") for e in self.events if e.get("event") == "step"]
        self.curves_step = max((n for n in steps if isinstance(n, int)), default=0)
        try:
            create_markdown_artifact(
                markdown=stage_curves_markdown(self.stage, self.events, self.total, state),
                key=curves_key(self.stage),
                description=f"training stage {self.stage}: loss, learning rate, tokens/s, evaluations",
            )
        except Exception as exc:  # noqa: BLE001 - the artifact is never the reason a stage fails
            self.logger.warning("%s: curves artifact not published: %s", self.stage, exc)

    def _push(self, value: float) -> None:
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.artifact_id, progress=value)
            self.last_value, self.last_push = value, time.monotonic()
        except Exception:
            pass

    def finish(self) -> None:
        self.publish_curves("finished")
        if self.artifact_id is not None and self.last_value < 100.0:
            self._push(100.0)


def run_stage_job(job: StageJob) -> tuple[CheckpointManifest, list[dict[str, Any]]]:
    """Run one stage (resuming from its newest published train-state); its checkpoint and events.

    A stage on several nodes runs as a JobSet when $VINASMOL_MULTINODE is `jobset` (the stage's run
    inside a cluster), otherwise as a group of torchrun agents on this machine."""
    from vinasmol_core.train import run_stage_process

    progress = StageProgress(job.spec.name, job.spec.total_steps, job.logging.artifact_interval)
    try:
        if job.spec.nodes > 1 and os.environ.get(MULTINODE_ENV, "local") == "jobset":
            from tasks.jobset import KubernetesGroupApi, run_stage_jobset, settings_from_env

            settings = settings_from_env(dict(os.environ))
            api = KubernetesGroupApi(settings.resolved_namespace())
            manifest = run_stage_jobset(job, api, settings, on_metrics=progress)
        else:
            manifest = run_stage_process(job, on_metrics=progress)
    except BaseException:
        progress.publish_curves("stopped")  # the curves up to the failure
        raise
    progress.finish()
    return manifest, progress.events


def fail_at_step_for(stage: str) -> int | None:
    """$VINASMOL_FAIL_AT="<stage>:<step>" injects a failure (tests of resume); never cached."""
    value = os.environ.get(FAIL_AT_ENV, "")
    if ":" not in value:
        return None
    name, _, at = value.rpartition(":")
    return int(at) if name == stage and at.strip().isdigit() else None


@step(Step.TRAIN_STAGE, exclude=("partial_suffix", "logging"))
def train_stage(
    spec: StageSpec,
    init_checkpoint: str,
    dataset: str,
    store_url: str,
    stage_runner: str = "inline",
    partial_suffix: str = "",
    logging: StageLogging | None = None,
) -> TrainedStage:
    """One training stage in its own process; resumes from the stage's newest partial checkpoint.

    Partial checkpoints live under a prefix derived from what the stage computes (spec, init, data),
    so a retry of the same run, or a new run of the same recipe, continues where the stage stopped.
    A forced stage gets a per-run suffix and so starts over."""
    t0 = time.perf_counter()
    job = StageJob(
        spec=spec,
        init_checkpoint=init_checkpoint,
        dataset=dataset,
        store_url=store_url,
        fail_at_step=fail_at_step_for(spec.name),
        logging=logging or StageLogging(),
    )
    key = job.resume_key()[:16]
    job.out_ref = f"stages/{spec.name}/{key}"
    job.partial_ref_prefix = f"partial/{spec.name}/{key}{partial_suffix}"
    if stage_runner == "deployment":
        from tasks.dispatch import run_stage_deployment

        manifest, events = run_stage_deployment(job), []
    else:
        manifest, events = run_stage_job(job)
    return TrainedStage(checkpoint=manifest, events=_condense(events), duration_s=time.perf_counter() - t0)


def _condense(events: list[dict[str, Any]], limit: int = 2000) -> list[dict[str, Any]]:
    """Keep the metrics small enough for a task result (every k-th train event, all eval events)."""
    train = [e for e in events if "loss" in e]
    other = [e for e in events if "loss" not in e]
    if len(train) > limit:
        k = -(-len(train) // limit)
        train = train[::k] + [train[-1]]
    keep = []
    for e in [*train, *other]:
        keep.append({k: v for k, v in e.items() if isinstance(v, (int, float, str, bool)) or v is None})
    return keep
