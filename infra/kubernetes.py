"""The Kubernetes work pool for CUDA nodes: its base job template and how a stage's job renders.

`infra/kubernetes/cuda-job-template.json` is Prefect's default Kubernetes base job template
(prefect-kubernetes 0.8.0, `KubernetesWorker.get_default_base_job_template()`) with:

* `gpu_count` → `nvidia.com/gpu` in the container's requests and limits (a stage with several devices
  runs torchrun inside the one pod: `run_stage_process` launches it from the stage flow);
* `node_selector` and `tolerations` for GPU nodes;
* a memory-backed `/dev/shm` of `shm_size` (NCCL and data-loader workers outgrow Docker's 64Mi);
* `store_secret_name`: a Secret whose keys become the environment (S3 credentials never travel in
  job variables or parameters);
* `pod_watch_timeout_seconds` raised from 60 to 1800 (GPU nodes scale up on demand, images are big);
* `completions`/`parallelism` moved to the Job spec (the default puts them in the pod spec).

Create the pool with:

    prefect work-pool create cuda --type kubernetes \
        --base-job-template infra/kubernetes/cuda-job-template.json

`render_job_manifest` fills the template the way a worker does, through Prefect's own
`BaseJobConfiguration.from_template_and_values` (with prefect-kubernetes'
`KubernetesWorkerJobConfiguration` when that package is installed; its dependencies, the Kubernetes
client and kopf, are not part of this project).
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

from prefect.workers.base import BaseJobConfiguration
from pydantic import Field

TEMPLATE_PATH = Path(__file__).resolve().parent / "kubernetes" / "cuda-job-template.json"


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The CUDA pool's base job template (`job_configuration` + `variables`)."""
    return json.loads(path.read_text())


class CudaJobConfiguration(BaseJobConfiguration):
    """The fields of prefect-kubernetes' job configuration that rendering needs (used without it)."""

    namespace: str = "default"
    job_manifest: dict[str, Any] = Field(default_factory=dict)
    cluster_config: Any = None
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int = 60
    stream_output: bool = True
    annotations: dict[str, str] | None = None


def configuration_class() -> type[BaseJobConfiguration]:
    """prefect-kubernetes' KubernetesWorkerJobConfiguration when importable, else CudaJobConfiguration."""
    try:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
    except ImportError:
        return CudaJobConfiguration
    return KubernetesWorkerJobConfiguration


class _NoClient:
    """Stands in for the API client: the template has no block or variable references to resolve."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"rendering the CUDA job template needed the Prefect API ({name})")


def render_configuration(
    values: dict[str, Any], template: dict[str, Any] | None = None
) -> BaseJobConfiguration:
    """The job configuration a worker would build from the template and a run's job variables."""
    template = copy.deepcopy(template or load_template())
    cls = configuration_class()
    return asyncio.run(cls.from_template_and_values(template, values, client=_NoClient()))


def render_job_manifest(values: dict[str, Any], template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Kubernetes Job manifest for `values` (e.g. {"gpu_count": 2, "node_selector": {...}})."""
    return render_configuration(values, template).job_manifest  # type: ignore[attr-defined]
