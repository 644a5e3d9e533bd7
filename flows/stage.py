"""The `vinasmol-stage` flow: one training stage from a StageJob.

This is the flow behind the training-stage deployment (`vinasmol-stage/train-stage`, on the CUDA work
pool). The pipeline's `train-stage` step (`tasks.train.train_stage`) builds the StageJob (inputs,
output ref, partial-checkpoint prefix: the resume key) and, with `stage_runner="deployment"`, hands it
to this flow through `tasks.dispatch.run_stage_deployment`; with `stage_runner="inline"` the step
runs the same `tasks.train.run_stage_job` itself. Either way the stage runs in a process of its own
(`python -m vinasmol_core.train`, torchrun when the stage asks for several devices), resumes from its
newest partial checkpoint in the store, and reports progress as a progress artifact, which the parent
mirrors into its own run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.train import run_stage_job
from vinasmol_core.train import StageJob


@flow(name="vinasmol-stage", log_prints=True, persist_result=False)
def vinasmol_stage(job: StageJob) -> dict[str, Any]:
    """Train one stage; returns the published checkpoint's digest, ref and step."""
    manifest, _ = run_stage_job(job)
    return {"digest": manifest.digest, "ref": job.out_ref, "step": manifest.step}
