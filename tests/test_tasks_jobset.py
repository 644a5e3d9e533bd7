"""A multi-node stage's JobSet: the pure manifest function, the manifest against the Kubernetes
client's own typed models (pod and Job parts) and against the JobSet API's documented fields, and
the create / watch / stream / delete logic of the stage run.

There is no cluster here: the create/watch/delete test drives `run_stage_jobset` through a fake
`GroupApi` (scripted JobSet status, pods and log lines). That is the one place a fake stands in, as
a JobSet controller cannot run without a Kubernetes API server; the real client wrapper
(`KubernetesGroupApi`) is not exercised here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.jobset import (
    RDZV_PORT,
    GroupSettings,
    group_name,
    jobset_manifest,
    run_stage_jobset,
    terminal_state,
)
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.train.metrics import METRICS_PREFIX, RESULT_PREFIX
from vinasmol_core.train.spec import StageJob, StageSpec

SETTINGS = GroupSettings(namespace="ml", image="registry.example.com/vinasmol:1.0", restarts=3, cpu="8",
                         memory="64Gi", queue_name="gpu-queue")


def _job(store_url: str = "file:///nowhere", nodes: int = 4, devices: int = 8) -> StageJob:
    spec = StageSpec(name="eeve-6", trainable="all", lr=2e-4, max_tokens=64 * 2048 * 10, nodes=nodes,
                     devices=devices, global_batch=64, micro_batch=2, mixture={"vi": 0.6, "en": 0.4})
    return StageJob(spec=spec, init_checkpoint="stages/eeve-4/x", dataset="data/main", store_url=store_url,
                    out_ref="stages/eeve-6/abc", partial_ref_prefix="partial/eeve-6/abc", fail_at_step=3)


def _pod(manifest: dict) -> dict:
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def test_manifest_names_ranks_env_resources_and_restart_bound() -> None:
    job = _job()
    m = jobset_manifest(job, SETTINGS)
    name = group_name(job)
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert m["metadata"] == {"name": name, "namespace": "ml", "labels": m["metadata"]["labels"]}
    assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert len(f"{name}-node-0-0") <= 63  # a pod's hostname is a DNS label
    spec = m["spec"]
    assert spec["failurePolicy"] == {"maxRestarts": 3}
    network = {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True}
    assert spec["network"] == network
    (rjob,) = spec["replicatedJobs"]
    assert rjob["replicas"] == 1
    jspec = rjob["template"]["spec"]
    # one indexed pod per node; a lost pod fails the Job at once and the JobSet restarts the group
    assert (jspec["completionMode"], jspec["completions"], jspec["parallelism"]) == ("Indexed", 4, 4)
    assert jspec["backoffLimit"] == 0
    pod = _pod(m)
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "vinasmol-stage"
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/vinasmol:1.0"
    cmd = c["command"]
    assert cmd[:3] == ["python", "-m", "vinasmol_core.train.agent"]  # torchrun, pod 0 hosting
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--max-restarts=3"} <= set(cmd)
    assert f"--rdzv-endpoint={name}-node-0-0.{name}:{RDZV_PORT}" in cmd  # pod 0 on the headless service
    assert cmd[-4:] == ["-m", "vinasmol_core.train", "--job-env", "VINASMOL_JOB"]
    env = {e["name"]: e for e in c["env"]}
    carried = StageJob.model_validate_json(env["VINASMOL_JOB"]["value"])
    assert carried.spec == job.spec and carried.out_ref == job.out_ref and carried.fail_at_step is None
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
        "['batch.kubernetes.io/job-completion-index']")
    assert c["envFrom"] == [{"secretRef": {"name": "vinasmol-store"}}]  # credentials only from the Secret
    for part in ("requests", "limits"):
        assert c["resources"][part] == {"nvidia.com/gpu": "8", "cpu": "8", "memory": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] and pod["tolerations"]


def test_manifest_refuses_one_node_and_a_bad_batch() -> None:
    with pytest.raises(VinaSmolError, match="nodes=1"):
        jobset_manifest(_job(nodes=1), SETTINGS)
    with pytest.raises(VinaSmolError, match="not divisible by the 96 devices"):
        jobset_manifest(_job(nodes=12, devices=8), SETTINGS)


class _Response:
    def __init__(self, obj: Any) -> None:
        self.data = json.dumps(obj)


def test_job_and_pod_parts_round_trip_through_the_kubernetes_client_models() -> None:
    """Every field of the Job template is one the client's typed models know, with the right type:
    deserialized into V1JobTemplateSpec and serialized back, nothing is lost or changed."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    template = jobset_manifest(_job(), SETTINGS)["spec"]["replicatedJobs"][0]["template"]
    model = api.deserialize(_Response(template), "V1JobTemplateSpec")
    assert api.sanitize_for_serialization(model) == template
    assert model.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
    # and the check can fail: a misspelt field is dropped by the models, so the round trip differs
    bad = json.loads(json.dumps(template))
    bad["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    assert api.sanitize_for_serialization(api.deserialize(_Response(bad), "V1JobTemplateSpec")) != bad


# The JobSet fields this project writes, as the JobSet API (jobset.x-k8s.io/v1alpha2, JobSetSpec,
# ReplicatedJob, Network, FailurePolicy, SuccessPolicy) documents them; there is no JobSet Python
# package to validate against.
JOBSET_FIELDS: dict[str, set[str]] = {
    "": {"apiVersion", "kind", "metadata", "spec"},
    "spec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
             "coordinator", "managedBy", "ttlSecondsAfterFinished", "volumeClaimPolicies"},
    "spec.replicatedJobs[]": {"name", "groupName", "template", "replicas", "dependsOn"},
    "spec.network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "spec.failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "spec.successPolicy": {"operator", "targetReplicatedJobs"},
}


def test_jobset_fields_are_the_documented_ones() -> None:
    m = jobset_manifest(_job(), SETTINGS)
    assert set(m) <= JOBSET_FIELDS[""] and set(m["spec"]) <= JOBSET_FIELDS["spec"]
    for rjob in m["spec"]["replicatedJobs"]:
        assert set(rjob) <= JOBSET_FIELDS["spec.replicatedJobs[]"] and {"name", "template"} <= set(rjob)
    for key in ("network", "failurePolicy", "successPolicy"):
        assert set(m["spec"][key]) <= JOBSET_FIELDS[f"spec.{key}"], key
    assert m["spec"]["successPolicy"]["operator"] in ("All", "Any")
    assert isinstance(m["spec"]["failurePolicy"]["maxRestarts"], int)


class _FakeCluster:
    """Scripted JobSet: its status per poll, and pods with their log lines (rank 0 on pod 1)."""

    def __init__(self, statuses: list[dict], pods: dict[str, list[str]]) -> None:
        self.statuses = statuses
        self.pod_logs = pods
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.polls = 0

    def create(self, manifest: dict[str, Any]) -> None:
        self.created.append(manifest)

    def status(self, name: str) -> dict[str, Any]:
        assert self.created and name == self.created[-1]["metadata"]["name"] and not self.deleted
        self.polls += 1
        return self.statuses[min(self.polls, len(self.statuses)) - 1]

    def pods(self, name: str) -> list[tuple[str, str]]:
        return [(pod, "Running") for pod in self.pod_logs] if self.polls > 1 else []

    def logs(self, pod: str) -> Iterator[str]:
        yield from self.pod_logs[pod]

    def delete(self, name: str) -> None:
        self.deleted.append(name)


def _line(event: dict) -> str:
    return METRICS_PREFIX + json.dumps(event)


def test_a_completed_jobset_streams_rank_zero_metrics_and_is_deleted(tmp_path: Path) -> None:
    from vinasmol_core.store import ArtifactStore

    store_url = (tmp_path / "store").as_uri()
    job = _job(store_url)
    published = ArtifactStore(store_url).publish(CheckpointManifest(format="litgpt", stage="eeve-6"),
                                                 ref=job.out_ref)
    name = group_name(job)
    events = [{"event": "start", "stage": "eeve-6", "world_size": 32},
              {"event": "step", "step": 1, "loss": 3.0}]
    cluster = _FakeCluster(
        [{}, {"restarts": 0}, {"terminalState": "Completed", "restarts": 0}],
        {f"{name}-node-0-0-a": ["Initializing distributed", "noise"],
         f"{name}-node-0-1-b": [*(_line(e) for e in events), RESULT_PREFIX + json.dumps({"digest": "x"})]},
    )
    seen: list[dict] = []
    got = run_stage_jobset(job, cluster, SETTINGS, seen.append, poll_seconds=0.01)
    assert got.digest == published.digest
    assert [c["metadata"]["name"] for c in cluster.created] == [name] and cluster.deleted == [name]
    assert seen == events


def test_a_jobset_out_of_restarts_fails_the_stage_and_is_deleted(tmp_path: Path) -> None:
    job = _job((tmp_path / "store").as_uri())
    failed = {"restarts": 3, "conditions": [
        {"type": "Failed", "status": "True", "message": "jobset failed: reached max restarts"}]}
    cluster = _FakeCluster([{}, failed], {"p": []})
    with pytest.raises(VinaSmolError, match="failed after 3 restart.*reached max restarts"):
        run_stage_jobset(job, cluster, SETTINGS, poll_seconds=0.01)
    assert cluster.deleted == [group_name(job)]
    assert terminal_state({"conditions": [{"type": "Completed", "status": "False"}]}) is None


class _ScriptedCluster(_FakeCluster):
    """`_FakeCluster` whose calls can fail as a real API server's do: each method takes its next
    outcome from `faults[method]` (an exception to raise, or None to answer), then answers."""

    def __init__(self, statuses: list[dict], pods: dict[str, list[str]], faults: dict[str, list]) -> None:
        super().__init__(statuses, pods)
        self.faults = faults
        self.calls: list[str] = []
        self.exists = False

    def _next(self, method: str) -> None:
        self.calls.append(method)
        queue = self.faults.get(method) or []
        if queue:
            fault = queue.pop(0)
            if fault is not None:
                raise fault

    def create(self, manifest: dict[str, Any]) -> None:
        self._next("create")
        self.created.append(manifest)
        self.exists = True

    def status(self, name: str) -> dict[str, Any]:
        self._next("status")
        self.polls += 1
        return self.statuses[min(self.polls, len(self.statuses)) - 1]

    def pods(self, name: str) -> list[tuple[str, str]]:
        self._next("pods")
        return super().pods(name)

    def delete(self, name: str) -> None:
        self._next("delete")
        self.deleted.append(name)


def _completed_run(tmp_path: Path) -> tuple[StageJob, str, dict[str, list[str]], list[dict]]:
    from vinasmol_core.store import ArtifactStore

    store_url = (tmp_path / "store").as_uri()
    job = _job(store_url)
    ArtifactStore(store_url).publish(CheckpointManifest(format="litgpt", stage="eeve-6"), ref=job.out_ref)
    name = group_name(job)
    events = [{"event": "step", "step": 7, "loss": 2.5}]
    return job, name, {f"{name}-node-0-0-a": [_line(e) for e in events]}, events


# No cluster runs here (see the module's docstring): these drive run_stage_jobset through a scripted
# fake of the Kubernetes API that answers as the API server does (409 on an existing name, 404 on a
# missing one, 5xx, 429 and dropped connections).
def test_a_retried_run_attaches_to_the_jobset_its_killed_attempt_left(tmp_path: Path) -> None:
    from tasks.jobset import GroupApiError

    job, name, pods, events = _completed_run(tmp_path)
    running = {"restarts": 0}
    cluster = _ScriptedCluster(
        [running, running, {"terminalState": "Completed"}], pods,
        {"create": [GroupApiError(409, "AlreadyExists")]},
    )
    seen: list[dict] = []
    got = run_stage_jobset(job, cluster, SETTINGS, seen.append, poll_seconds=0.01, log=lambda m: None)
    assert got.stage == "eeve-6" and seen == events
    assert cluster.calls.count("create") == 1 and cluster.created == []  # followed, not re-created
    assert cluster.deleted == [name]  # once, after it completed


def test_a_failed_jobset_left_by_an_earlier_attempt_is_replaced(tmp_path: Path) -> None:
    from tasks.jobset import GroupApiError

    job, name, pods, events = _completed_run(tmp_path)
    failed = {"terminalState": "Failed", "restarts": 3}
    cluster = _ScriptedCluster(
        [failed, {}, {}, {"terminalState": "Completed"}], pods,
        {"create": [GroupApiError(409, "AlreadyExists")],
         "status": [None, GroupApiError(404, "NotFound")]},  # after the delete: gone
    )
    seen: list[dict] = []
    run_stage_jobset(job, cluster, SETTINGS, seen.append, poll_seconds=0.01, log=lambda m: None)
    assert [c["metadata"]["name"] for c in cluster.created] == [name]  # the new group
    assert cluster.calls.index("delete") < len(cluster.calls) - 1  # the failed one went first
    assert cluster.deleted == [name, name] and seen == events


def test_transient_api_errors_do_not_delete_a_training_jobset(tmp_path: Path) -> None:
    from tasks.jobset import GroupApiError

    job, name, pods, events = _completed_run(tmp_path)
    cluster = _ScriptedCluster(
        [{}, {}, {}, {"terminalState": "Completed"}], pods,
        {"create": [GroupApiError(503, "Service Unavailable")],
         "status": [None, GroupApiError(500, "etcd leader changed"), GroupApiError(None, "connection reset"),
                    GroupApiError(429, "Too Many Requests"), None],
         "pods": [None, ConnectionResetError("peer")]},
    )
    seen: list[dict] = []
    logged: list[str] = []
    got = run_stage_jobset(job, cluster, SETTINGS, seen.append, poll_seconds=0.01, log=logged.append)
    assert got.stage == "eeve-6" and seen == events
    assert cluster.deleted == [name] and cluster.calls[-1] == "delete"  # only after it completed
    assert len(logged) == 5 and "etcd leader changed" in " ".join(logged)
    # an error that is not transient (forbidden) ends the watch at once, and the JobSet is deleted
    other = _ScriptedCluster([{}], pods, {"status": [GroupApiError(403, "Forbidden")]})
    with pytest.raises(GroupApiError, match="Forbidden"):
        run_stage_jobset(job, other, SETTINGS, poll_seconds=0.01, log=lambda m: None)
    assert other.deleted == [name]
    # and patience runs out: a server that stays down is given up on after api_patience_seconds
    impatient = SETTINGS.model_copy(update={"api_patience_seconds": 0.05})
    down = _ScriptedCluster([{}], pods, {"status": [GroupApiError(503, "down")] * 1000})
    with pytest.raises(GroupApiError, match="down"):
        run_stage_jobset(job, down, impatient, poll_seconds=0.01, log=lambda m: None)


def test_pods_get_time_to_finish_a_step_and_publish_a_train_state() -> None:
    from tasks.jobset import TRAIN_STATE_BYTES_PER_PARAM, shutdown_seconds

    def times(n_params: int | None, settings: GroupSettings = SETTINGS) -> tuple[int, int]:
        m = jobset_manifest(_job(), settings, n_params)
        env = {e["name"]: e.get("value") for e in _pod(m)["containers"][0]["env"]}
        return int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]), _pod(m)["terminationGracePeriodSeconds"]

    floor = SETTINGS.min_shutdown_seconds
    assert times(None) == (floor, floor + 30)  # unknown model: the floor, well above the 30 s defaults
    # a 4 GB train-state: a step plus its upload at the settings' rate
    n = 4_000_000_000 // TRAIN_STATE_BYTES_PER_PARAM
    slow = SETTINGS.model_copy(update={"publish_mb_per_s": 20.0, "step_seconds": 90.0})
    torchrun, grace = times(n, slow)
    assert torchrun >= 90 + 4000 / 20 and grace == torchrun + 30
    assert times(7_000_000_000)[0] > times(360_000_000)[0] >= floor  # bigger model, longer
    fixed = SETTINGS.model_copy(update={"shutdown_seconds": 900})
    assert times(7_000_000_000, fixed) == (900, 930) and shutdown_seconds(fixed) == 900


def test_pod_zero_hosts_the_rendezvous() -> None:
    """Each pod's agent names the rendezvous host from its index: pod 0 hosts, whether or not its own
    DNS name resolves yet when its agent starts."""
    from vinasmol_core.common.errors import ConfigError
    from vinasmol_core.train.agent import torchrun_args

    m = jobset_manifest(_job(), SETTINGS)
    c = _pod(m)["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("job-completion-index']")
    assert c["command"][1:3] == ["-m", "vinasmol_core.train.agent"]
    args = c["command"][3:]
    assert torchrun_args(args, "0") == ["--rdzv-conf=is_host=1", *args]
    assert torchrun_args(args, "3") == ["--rdzv-conf=is_host=0", *args]
    with pytest.raises(ConfigError, match="NODE_RANK"):
        torchrun_args(args, None)


def test_the_pod_agent_runs_torchrun_as_this_process(tmp_path: Path) -> None:
    """The agent module is torchrun itself (no child torchrun), the host conf passed through."""
    import os
    import subprocess
    import sys

    from vinasmol_core.localserver.localhost import server_port

    script = tmp_path / "worker.py"
    out = tmp_path / "worker.json"
    script.write_text(
        "import json, os, sys\n"
        "got = {'ppid': os.getppid(), 'run': os.environ['TORCHELASTIC_RUN_ID']}\n"
        f"json.dump(got, open({str(out)!r}, 'w'))\n"
    )
    cmd = [sys.executable, "-m", "vinasmol_core.train.agent", "--nnodes=1", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{server_port()}", "--rdzv-id=pod-test",
           "--monitor-interval=0.2", str(script)]
    proc = subprocess.Popen(cmd, env={**os.environ, "NODE_RANK": "0", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output
    got = json.loads(out.read_text())
    assert got == {"ppid": proc.pid, "run": "pod-test"}
