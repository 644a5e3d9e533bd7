"""Prefect task of one training stage: a thin wrapper over `run_stage_process`.

The stage runs in a process of its own (torchrun for several devices); this task streams its
metrics into a Prefect progress artifact and the run log. Caching and result storage are wired by
the flows (`train_stage.with_options(...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from vinasmol_core.manifests import CheckpointManifest
from vinasmol_core.train import StageJob


def progress_reporter(job: StageJob) -> Callable[[dict[str, Any]], None]:
    """A metrics callback that moves a progress artifact and logs steps and evaluations."""
    logger = get_run_logger()
    total = max(job.spec.total_steps, 1)
    artifact_id = create_progress_artifact(
        progress=0.0, key=None, description=f"training stage {job.spec.name}: optimizer steps done"
    )
    state = {"last": -1.0}

    def on_metrics(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "step":
            pct = round(100.0 * event["step"] / total, 1)
            if pct > state["last"]:
                update_progress_artifact(artifact_id, progress=pct)
                state["last"] = pct
            logger.info(
                "%s step %d/%d loss %.4f lr %.2e %.0f tok/s",
                job.spec.name,
                event["step"],
                total,
                event["loss"],
                event["lr"],
                event["tokens_per_s"],
            )
        elif kind == "eval":
            logger.info(
                "%s eval @ %d: loss %s bpb %s",
                job.spec.name,
                event["step"],
                event["val_loss"],
                event["val_bpb"],
            )
        elif kind == "start" and event.get("resumed_from"):
            logger.info("%s resumed from step %s", job.spec.name, event["resumed_from"])

    return on_metrics


@task(name="train-stage")
def train_stage(job: StageJob) -> CheckpointManifest:
    """Run one stage (resuming from its newest published train-state); return its litgpt checkpoint."""
    from vinasmol_core.train.process import run_stage_process

    return run_stage_process(job, progress_reporter(job))
