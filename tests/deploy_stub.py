"""A trivial stage flow and a parent that runs it through `tasks.dispatch.run_stage_deployment`.

Deployed by tests/test_infra_stack.py next to the real deployments, so the remote runner (idempotency
keys per attempt, retry of failed children, progress mirroring, parent retry) is tested without
training anything.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel

from tasks.dispatch import run_stage_deployment
from vinasmol_core.manifests import CheckpointManifest


class StubSpec(BaseModel):
    name: str
    devices: int = 1


class StubJob(BaseModel):
    spec: StubSpec
    store_url: str | None = None
    out_ref: str
    fail_at_step: int | None = None


@flow(name="stub-stage", persist_result=False)
def stub_stage(job: StubJob) -> str:
    """Counts to 4, moving a progress artifact; fails at `fail_at_step`; publishes a manifest."""
    from vinasmol_core.store import ArtifactStore

    artifact = create_progress_artifact(progress=0.0, description=f"stub stage {job.spec.name}")
    for step in range(1, 5):
        if job.fail_at_step is not None and step == job.fail_at_step:
            raise RuntimeError(f"injected failure at step {step}")
        update_progress_artifact(artifact, progress=25.0 * step)
        time.sleep(0.2)
    store = ArtifactStore(job.store_url)
    manifest = CheckpointManifest(format="litgpt", name=job.spec.name, stage=job.spec.name, step=4)
    published = store.publish(manifest, ref=job.out_ref)
    return published.digest


@flow(name="stub-parent", persist_result=False)
def stub_parent(run_tag: str, fail_at_step: int | None = None, attempts: int = 2) -> int:
    """Runs one stub stage through the stage deployment; returns the checkpoint's step."""
    job = StubJob(spec=StubSpec(name="stub"), out_ref=f"stub/{run_tag}", fail_at_step=fail_at_step)
    manifest = run_stage_deployment(job, deployment="stub-stage/stub", max_attempts=attempts, poll_seconds=1)
    return manifest.step
