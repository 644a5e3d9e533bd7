"""The `vinasmol-stage` flow: one training stage from a StageJob.

This is the flow behind the training-stage deployment (`vinasmol-stage/train-stage`, on the CUDA work
pool). It runs the same `train_stage` task as the pipeline's inline path, so caching, partial
checkpoints, progress and metrics artifacts behave the same either way. The stage itself runs in a
process of its own (`python -m vinasmol_core.train`, or torchrun when the stage asks for several
devices), never inside the worker.
"""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="vinasmol-stage", log_prints=True, persist_result=False)
def vinasmol_stage(job: dict[str, Any]) -> dict[str, Any]:
    """Train one stage; returns the published checkpoint's digest, ref and step."""
    from tasks.train import train_stage
    from vinasmol_core.train import StageJob

    stage_job = StageJob.model_validate(job)
    manifest = train_stage(stage_job)
    return {"digest": manifest.digest, "ref": stage_job.out_ref, "step": getattr(manifest, "step", None)}
