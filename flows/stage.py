"""The `vinasmol-stage` flow: one training stage from a StageJob.

This is the flow behind the training-stage deployment (`vinasmol-stage/train-stage`, on the CUDA work
pool). The pipeline's `train` step builds the StageJob (inputs, output ref, partial-checkpoint
prefix: the resume key) and, with `stage_runner="deployment"`, hands it to this flow through
`flows.remote.run_stage_deployment`; with `stage_runner="inline"` it runs the same
`run_stage_process` in its own task. Either way the stage runs in a process of its own
(`python -m vinasmol_core.train`, torchrun when the stage asks for several devices), resumes from its
newest partial checkpoint in the store, and reports progress the same way (the step's progress
artifact), so a child run in the UI looks like the inline step.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from vinasmol_core.train import StageJob


@task(name="train-stage-job", cache_policy=NO_CACHE, persist_result=False)
def run_stage_job(job: StageJob) -> dict[str, Any]:
    """Run the stage process, streaming its metrics into a progress artifact and a metrics table."""
    from prefect.artifacts import create_table_artifact

    from tasks.pipeline import _condense, _Progress
    from vinasmol_core.train import run_stage_process

    progress = _Progress(job.spec.name, job.spec.total_steps)
    manifest = run_stage_process(job, on_metrics=progress)
    progress.finish()
    rows = [e for e in _condense(progress.events, limit=200) if "loss" in e]
    if rows:
        create_table_artifact(
            table=rows,
            key=f"metrics-{_slug(job.spec.name)}",
            description=f"training stage {job.spec.name}: metrics per logged step",
        )
    return {"digest": manifest.digest, "ref": job.out_ref, "step": manifest.step}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "stage"


@flow(name="vinasmol-stage", log_prints=True, persist_result=False)
def vinasmol_stage(job: StageJob) -> dict[str, Any]:
    """Train one stage; returns the published checkpoint's digest, ref and step."""
    return run_stage_job(job)
