"""Work-pool templates, the heartbeat automation and prefect.yaml, checked without a server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from infra.automation import load_automation
from infra.kubernetes import (
    CudaJobConfiguration,
    configuration_class,
    load_template,
    render_configuration,
    render_job_manifest,
)

REPO = Path(__file__).resolve().parent.parent
TWO_GPU = {
    "gpu_count": 2,
    "node_selector": {"cloud.example.com/gpu": "h100", "topology.kubernetes.io/zone": "zone-a"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
    "image": "registry.example.com/vinasmol:1.0",
}


def _pod(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def test_two_gpu_stage_renders_gpu_request_node_selector_and_tolerations() -> None:
    config = render_configuration(TWO_GPU)
    pod = _pod(config.job_manifest)
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.example.com/vinasmol:1.0"
    assert pod["nodeSelector"] == TWO_GPU["node_selector"]
    assert pod["tolerations"] == TWO_GPU["tolerations"]
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert config.pod_watch_timeout_seconds >= 600  # raised from Prefect's 60 s
    assert config.job_manifest["spec"]["backoffLimit"] == 0  # retries belong to the parent flow


def test_defaults_ask_for_one_gpu_on_gpu_nodes() -> None:
    pod = _pod(render_job_manifest({}))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]
    # credentials come from a Secret, never from job variables
    assert pod["containers"][0]["envFrom"][0]["secretRef"]["name"] == "vinasmol-store"


def test_every_placeholder_has_a_variable() -> None:
    template = load_template()
    text = json.dumps(template["job_configuration"])
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", text))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    assert {"gpu_count", "node_selector", "tolerations", "shm_size", "image"} <= used


def test_renders_with_prefect_kubernetes() -> None:
    import prefect_kubernetes  # noqa: F401 - the test extra installs it

    assert configuration_class() is not CudaJobConfiguration
    pod = _pod(render_job_manifest(TWO_GPU))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_docker_job_variables_request_gpus() -> None:
    from docker.types import HostConfig

    variables = yaml.safe_load((REPO / "infra/docker/cuda-job-variables.yaml").read_text())
    host = HostConfig(version="1.44", **variables["container_create_kwargs"])
    (request,) = host["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]]
    assert host["ShmSize"] >= 1 << 30


def test_heartbeat_automation_is_proactive_and_crashes_silent_runs() -> None:
    automation = load_automation()
    trigger = automation.trigger
    assert trigger.posture.value == "Proactive"
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.heartbeat" in trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.within.total_seconds() >= 60
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    assert load_automation(within_seconds=45).trigger.within.total_seconds() == 45


def test_prefect_yaml_declares_the_four_deployments() -> None:
    doc = yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"full-cpt", "annealing", "sweep", "train-stage"}
    for dep in deps.values():
        path, _, func = dep["entrypoint"].partition(":")
        assert (REPO / path).exists() and f"def {func}(" in (REPO / path).read_text()
    assert deps["full-cpt"]["parameters"]["stage_runner"] == "deployment"
    annealing = deps["annealing"]
    assert annealing["parameters"]["from_stage"] == "annealing" and annealing["parameters"]["start_ref"]
    assert annealing["schedules"][0]["cron"] == "{{ $VINASMOL_ANNEALING_CRON }}"
    assert deps["train-stage"]["work_pool"]["name"] == "{{ $VINASMOL_CUDA_POOL }}"
    sweep = deps["sweep"]["parameters"]
    assert (REPO / sweep["recipe"]).is_file() and (REPO / sweep["sweep_file"]).is_file()
    assert sweep["stage_runner"] == "deployment"


MULTINODE = REPO / "infra/kubernetes/multinode"


def _round_trip(obj: dict, kind: str) -> None:
    """The object is exactly what the Kubernetes client's typed model `kind` reads and writes back."""
    from kubernetes.client import ApiClient

    class _Response:
        data = json.dumps(obj)

    api = ApiClient()
    assert api.sanitize_for_serialization(api.deserialize(_Response(), kind)) == obj, kind


def test_multinode_rbac_grants_what_the_stage_run_calls() -> None:
    from tasks.jobset import GroupSettings

    docs = list(yaml.safe_load_all((MULTINODE / "rbac.yaml").read_text()))
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        _round_trip(doc, {"ServiceAccount": "V1ServiceAccount", "Role": "V1Role",
                          "RoleBinding": "V1RoleBinding"}[doc["kind"]])
    accounts = {d["metadata"]["name"] for d in by_kind["ServiceAccount"]}
    assert GroupSettings().service_account in accounts and "vinasmol-orchestrator" in accounts
    (role,) = by_kind["Role"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    # KubernetesGroupApi: create/get/delete a JobSet, list pods by label, follow a pod's log
    needed = {("jobset.x-k8s.io", "jobsets", v) for v in ("create", "get", "delete")}
    needed |= {("", "pods", "list"), ("", "pods/log", "get")}
    assert needed <= granted, needed - granted
    (binding,) = by_kind["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vinasmol-orchestrator"}]


def test_multinode_store_secret_and_settings_match_the_manifest() -> None:
    from tasks.jobset import GroupSettings

    secret = yaml.safe_load((MULTINODE / "store-secret.yaml").read_text())
    _round_trip(secret, "V1Secret")
    assert secret["metadata"]["name"] == GroupSettings().store_secret
    assert "VINASMOL_STORE" in secret["stringData"]
    settings = GroupSettings.model_validate_json((MULTINODE / "settings.json").read_text())
    assert settings.restarts >= 1 and settings.store_secret == secret["metadata"]["name"]
