"""A multi-node stage on Kubernetes as one JobSet (jobset.x-k8s.io/v1alpha2, kubernetes-sigs/jobset).

`jobset_manifest(job, settings)` is a pure function from a `StageJob` to the JobSet: one replicated
job of `nodes` indexed pods (one per node, `devices` GPUs each), each running the torchrun agent
that the local group runs on 127.0.0.1 (`vinasmol_core.train.group`), with the c10d rendezvous on
pod 0 through the JobSet's headless service (`<name>-node-0-0.<name>`), pod 0 hosting it
(`vinasmol_core.train.agent`). A lost pod fails its Job (`backoffLimit: 0`); the JobSet's failure
policy then recreates every pod, at most `settings.restarts` times, and the stage resumes from its
newest partial checkpoint in the store. A pod told to stop (SIGTERM: eviction, preemption, a
restart of the group) gets time to finish its step and publish a train-state: torchrun's shutdown
timeout and the pod's termination grace period are sized from the model (`shutdown_seconds`).

`run_stage_jobset(job, api, ...)` is what the stage's Prefect run does with it: create the JobSet
(or attach to the one an earlier attempt of the run left running), watch it, stream rank 0's
metric lines from the pods' logs into the run, delete it at the end. Transient API errors (5xx,
429, lost connections) are retried with backoff, not taken for the end of the stage.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.train.metrics import parse_line
from vinasmol_core.train.spec import StageJob

GROUP, VERSION, PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
REPLICATED_JOB = "node"
RDZV_PORT = 29400
JOB_ENV = "VINASMOL_JOB"
NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # set by the JobSet controller on every pod
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A train-state per parameter: fp32 weights and AdamW's two fp32 moments, with room for the rest.
TRAIN_STATE_BYTES_PER_PARAM = 16
# torchrun exits this long after its own shutdown timeout (it SIGKILLs what is left, then returns).
AGENT_EXIT_MARGIN_S = 30


class GroupApiError(Exception):
    """A failed cluster call: `status` is the HTTP status, None when no answer came (connection)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status or 'no answer'}: {message}")
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth trying again: no answer, throttled (429) or a server error (5xx)."""
        return self.status is None or self.status == 429 or self.status >= 500


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, GroupApiError):
        return exc.transient
    return isinstance(exc, ConnectionError | TimeoutError)


class GroupSettings(BaseModel):
    """Where and how a stage's JobSet runs; `VINASMOL_JOBSET_SETTINGS` (JSON) overrides the defaults."""

    namespace: str | None = Field(default=None, description="default: the pod's own namespace")
    image: str = "vinasmol:latest"
    service_account: str = "vinasmol-stage"
    store_secret: str = "vinasmol-store"
    shm_size: str = "16Gi"
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    restarts: int = Field(default=2, ge=0, description="JobSet restarts after a lost pod; torchrun's too")
    queue_name: str | None = Field(default=None, description="Kueue LocalQueue: all-or-nothing admission")
    ttl_seconds: int = Field(default=86400, ge=0)
    step_seconds: float = Field(default=120.0, gt=0, description="upper bound of one training step")
    publish_mb_per_s: float = Field(default=100.0, gt=0, description="train-state upload rate to the store")
    min_shutdown_seconds: int = Field(default=300, ge=30, description="floor of the workers' shutdown time")
    shutdown_seconds: int | None = Field(
        default=None, ge=30, description="workers' shutdown time; default: from the model (shutdown_seconds)"
    )
    api_patience_seconds: float = Field(
        default=600.0, ge=0, description="how long transient cluster API errors are retried"
    )

    def resolved_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        return _NAMESPACE_FILE.read_text().strip() if _NAMESPACE_FILE.exists() else "default"


def group_name(job: StageJob) -> str:
    """`vs-<stage>-<resume key>`: a DNS label short enough for the pods' hostnames (63 characters)."""
    stage = re.sub(r"[^a-z0-9-]+", "-", job.spec.name.lower()).strip("-")[:24] or "stage"
    return f"vs-{stage}-{job.resume_key()[:10]}"


def shutdown_seconds(settings: GroupSettings, n_params: int | None = None) -> int:
    """Seconds the workers of a pod told to stop get to finish their step and publish a train-state
    (torchrun's shutdown timeout): a step plus the upload of `TRAIN_STATE_BYTES_PER_PARAM` bytes a
    parameter at `publish_mb_per_s`, at least `min_shutdown_seconds`; `shutdown_seconds` overrides."""
    if settings.shutdown_seconds is not None:
        return settings.shutdown_seconds
    publish = 0.0
    if n_params:
        publish = TRAIN_STATE_BYTES_PER_PARAM * n_params / (settings.publish_mb_per_s * 1e6)
    return max(settings.min_shutdown_seconds, math.ceil(settings.step_seconds + publish))


def _agent_args(job: StageJob, name: str, restarts: int) -> list[str]:
    spec = job.spec
    return [
        "python", "-m", "vinasmol_core.train.agent",
        f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.devices}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-{REPLICATED_JOB}-0-0.{name}:{RDZV_PORT}",
        f"--rdzv-id={name}", f"--max-restarts={restarts}",
        "-m", "vinasmol_core.train", "--job-env", JOB_ENV,
    ]


def _container(job: StageJob, name: str, s: GroupSettings, shutdown: int) -> dict[str, Any]:
    gpus = {"nvidia.com/gpu": str(job.spec.devices)} if job.spec.accelerator != "cpu" else {}
    extra = {k: v for k, v in (("cpu", s.cpu), ("memory", s.memory)) if v}
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    payload = job.model_copy(update={"fail_at_step": None}).model_dump_json()  # fault injection: local only
    return {
        "name": "stage",
        "image": s.image,
        "command": _agent_args(job, name, s.restarts),
        "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}],
        "env": [
            {"name": JOB_ENV, "value": payload},
            # the pod's index: node 0 hosts the rendezvous (vinasmol_core.train.agent)
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
            {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(shutdown)},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "envFrom": [{"secretRef": {"name": s.store_secret}}],
        "resources": {"requests": {**gpus, **extra}, "limits": {**gpus, **extra}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def jobset_manifest(
    job: StageJob, settings: GroupSettings | None = None, n_params: int | None = None
) -> dict[str, Any]:
    """The JobSet of a stage with `nodes > 1`: pods, ranks, rendezvous, resources, restart bound, and
    the time a stopped pod gets (sized from the model's `n_params` when given)."""
    s = settings or GroupSettings()
    spec = job.spec
    if spec.nodes < 2:
        raise VinaSmolError(f"stage {spec.name}: nodes={spec.nodes}; a JobSet is for stages on several nodes")
    spec.check()
    name = group_name(job)
    labels = {"app.kubernetes.io/name": "vinasmol", "app.kubernetes.io/component": "stage",
              "vinasmol.stage": re.sub(r"[^A-Za-z0-9._-]", "-", spec.name)[:63]}
    if s.queue_name:
        labels["kueue.x-k8s.io/queue-name"] = s.queue_name
    shutdown = shutdown_seconds(s, n_params)
    pod = {
        "serviceAccountName": s.service_account,
        "restartPolicy": "Never",
        # SIGTERM to the agent, torchrun's shutdown timeout for the workers, then the agent's exit
        "terminationGracePeriodSeconds": shutdown + AGENT_EXIT_MARGIN_S,
        "containers": [_container(job, name, s, shutdown)],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}}],
        "nodeSelector": dict(s.node_selector),
        "tolerations": list(s.tolerations),
    }
    job_template = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
            "backoffLimit": 0,  # one lost pod fails the Job; the JobSet restarts the whole group
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": s.resolved_namespace(), "labels": labels},
        "spec": {
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": job_template}],
            "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            "failurePolicy": {"maxRestarts": s.restarts},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "ttlSecondsAfterFinished": s.ttl_seconds,
        },
    }


class GroupApi(Protocol):
    """The calls the stage run makes on the cluster (KubernetesGroupApi in production). Each raises
    GroupApiError for a failed call: 409 from `create` when the JobSet exists, 404 from `status`
    when it does not."""

    def create(self, manifest: dict[str, Any]) -> None: ...
    def status(self, name: str) -> dict[str, Any]: ...
    def pods(self, name: str) -> list[tuple[str, str]]: ...  # (pod name, phase)
    def logs(self, pod: str) -> Iterator[str]: ...  # follows the pod's log to its end
    def delete(self, name: str) -> None: ...  # no error when it is gone already


class KubernetesGroupApi:
    """GroupApi on the official Kubernetes client (`pip install kubernetes`), in-cluster or kubeconfig."""

    def __init__(self, namespace: str) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.namespace = namespace
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()
        self._delete_options = client.V1DeleteOptions(propagation_policy="Foreground")

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        """`fn()`, its API and connection errors as GroupApiError."""
        import urllib3.exceptions
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as exc:
            raise GroupApiError(exc.status or None, str(exc.reason)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise GroupApiError(None, f"{type(exc).__name__}: {exc}") from exc

    def create(self, manifest: dict[str, Any]) -> None:
        ns = self.namespace
        self._call(lambda: self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest))

    def status(self, name: str) -> dict[str, Any]:
        obj = self._call(
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        )
        return dict(obj.get("status") or {})

    def pods(self, name: str) -> list[tuple[str, str]]:
        found = self._call(
            lambda: self.core.list_namespaced_pod(self.namespace, label_selector=f"{NAME_LABEL}={name}")
        )
        return [(p.metadata.name, p.status.phase or "Unknown") for p in found.items]

    def logs(self, pod: str) -> Iterator[str]:
        ns = self.namespace
        resp = self._call(
            lambda: self.core.read_namespaced_pod_log(pod, ns, follow=True, _preload_content=False)
        )
        buf = b""
        for chunk in resp.stream():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            yield from (line.decode("utf-8", "replace") for line in lines)
        if buf:
            yield buf.decode("utf-8", "replace")

    def delete(self, name: str) -> None:
        try:
            self._call(
                lambda: self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, body=self._delete_options
                )
            )
        except GroupApiError as exc:
            if exc.status != 404:
                raise


def terminal_state(status: dict[str, Any]) -> str | None:
    """'Completed' or 'Failed' once the JobSet has finished (status.terminalState or its conditions)."""
    if status.get("terminalState") in ("Completed", "Failed"):
        return str(status["terminalState"])
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("Completed", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


class _Patient:
    """Cluster calls that ride out transient errors: tried again with backoff (from `first_wait`
    seconds, doubling, at most 30) for `patience` seconds, then raised."""

    def __init__(self, patience: float, first_wait: float, log: Callable[[str], None]) -> None:
        self.patience, self.first_wait, self.log = patience, first_wait, log

    def __call__(self, fn: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.patience
        wait = self.first_wait
        while True:
            try:
                return fn()
            except Exception as exc:
                if not _transient(exc) or time.monotonic() + wait > deadline:
                    raise
                self.log(f"{what}: {exc}; trying again in {wait:.0f} s")
            time.sleep(wait)
            wait = min(2 * wait, 30.0)


def _model_params(job: StageJob) -> int | None:
    """Parameters of the stage's model, from its initial checkpoint's config in the store (None when
    it cannot be read: the shutdown time then falls back to its floor)."""
    try:
        from vinasmol_core.store import ArtifactStore
        from vinasmol_core.train.runtime import count_params

        manifest = ArtifactStore(job.store_url).get_manifest(job.init_checkpoint)
        return count_params(getattr(manifest, "model_config_", {}) or {})
    except Exception:  # an estimate only: never the reason a stage does not start
        return None


def _create_or_attach(
    api: GroupApi, manifest: dict[str, Any], call: _Patient, poll_seconds: float, log: Callable[[str], None]
) -> None:
    """Create the JobSet; when it exists (an earlier attempt of this run was killed), attach to it if
    it runs or has completed, and replace it if it has failed."""
    name = manifest["metadata"]["name"]
    deadline = time.monotonic() + max(call.patience, 60.0)
    while True:
        try:
            call(lambda: api.create(manifest), f"creating JobSet {name}")
            return
        except GroupApiError as exc:
            if exc.status != 409:
                raise
        try:
            status = call(lambda: api.status(name), f"reading JobSet {name}")
        except GroupApiError as exc:
            if exc.status == 404:  # gone meanwhile (being deleted): create it again
                time.sleep(poll_seconds)
                continue
            raise
        if terminal_state(status) != "Failed":
            log(f"JobSet {name} exists already (an earlier attempt): following it")
            return
        log(f"JobSet {name} exists already and has failed: deleting it and starting the group again")
        call(lambda: api.delete(name), f"deleting JobSet {name}")
        while True:  # the deletion is asynchronous: wait until it is gone
            if time.monotonic() > deadline:
                raise VinaSmolError(f"JobSet {name}: the failed one left by an earlier attempt is not gone")
            try:
                call(lambda: api.status(name), f"reading JobSet {name}")
            except GroupApiError as exc:
                if exc.status == 404:
                    break
                raise
            time.sleep(poll_seconds)


def run_stage_jobset(
    job: StageJob,
    api: GroupApi,
    settings: GroupSettings | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    *,
    poll_seconds: float = 5.0,
    n_params: int | None = None,
    log: Callable[[str], None] = print,
) -> CheckpointManifest:
    """Create the stage's JobSet (or attach to the one an earlier attempt left), follow every pod's
    log (only rank 0 prints metric lines) into `on_metrics`, and return the published checkpoint
    when the JobSet completes. Transient API errors are retried for `settings.api_patience_seconds`.
    Raises VinaSmolError when it fails (its restarts spent): the parent's retry takes over. The
    JobSet is deleted in every case once this run watched it to its end or gave up on it.
    `n_params` (default: counted from the initial checkpoint) sizes the pods' shutdown time."""
    from vinasmol_core.store import ArtifactStore

    if not job.out_ref:
        raise VinaSmolError(f"stage {job.spec.name}: a JobSet stage needs the job's out_ref set")
    s = settings or GroupSettings()
    if n_params is None and s.shutdown_seconds is None:
        n_params = _model_params(job)
    manifest = jobset_manifest(job, s, n_params)
    name = manifest["metadata"]["name"]
    lock = threading.Lock()
    followers: dict[str, threading.Thread] = {}
    call = _Patient(s.api_patience_seconds, max(poll_seconds, 0.01), log)

    def follow(pod: str) -> None:
        try:
            for line in api.logs(pod):
                with lock:
                    parse_line(line, on_metrics)
        except Exception as exc:  # the log stream is not the stage: the JobSet's status decides
            log(f"log of pod {pod} interrupted: {exc}")

    _create_or_attach(api, manifest, call, poll_seconds, log)
    try:
        while True:
            status = call(lambda: api.status(name), f"reading JobSet {name}")
            for pod, phase in call(lambda: api.pods(name), f"listing the pods of JobSet {name}"):
                if pod not in followers and phase in ("Running", "Succeeded", "Failed"):
                    followers[pod] = threading.Thread(target=follow, args=(pod,), daemon=True)
                    followers[pod].start()
            state = terminal_state(status)
            if state is not None:
                break
            time.sleep(poll_seconds)
        for thread in followers.values():
            thread.join(timeout=30)
        if state == "Failed":
            message = next((c.get("message", "") for c in status.get("conditions") or []
                            if c.get("type") == "Failed"), "")
            raise VinaSmolError(
                f"stage {job.spec.name}: JobSet {name} failed after {status.get('restarts', 0)} restart(s) "
                f"of the group: {message}".rstrip(": ")
            )
    finally:
        try:
            call(lambda: api.delete(name), f"deleting JobSet {name}")
        except Exception as exc:  # its ttlSecondsAfterFinished removes it later
            log(f"JobSet {name} not deleted: {exc}")
    out = ArtifactStore(job.store_url).get_manifest(job.out_ref)
    if not isinstance(out, CheckpointManifest):
        raise VinaSmolError(f"stage {job.spec.name}: {job.out_ref} is not a checkpoint")
    return out


def settings_from_env(environ: dict[str, str]) -> GroupSettings:
    raw = environ.get("VINASMOL_JOBSET_SETTINGS", "")
    return GroupSettings.model_validate(json.loads(raw)) if raw else GroupSettings()


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.jobset --job job.json [--settings settings.json]`: print the stage's JobSet
    (pipe it to `kubectl apply --dry-run=server -f -` to check it against the cluster's CRD)."""
    import argparse

    from vinasmol_core.train.spec import load_job

    parser = argparse.ArgumentParser(prog="python -m tasks.jobset", description=main.__doc__)
    parser.add_argument("--job", type=Path, required=True, help="StageJob JSON")
    parser.add_argument("--settings", type=Path, default=None, help="GroupSettings JSON")
    args = parser.parse_args(argv)
    settings = GroupSettings()
    if args.settings is not None:
        settings = GroupSettings.model_validate_json(args.settings.read_text(encoding="utf-8"))
    print(json.dumps(jobset_manifest(load_job(args.job), settings), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
