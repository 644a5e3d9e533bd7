"""The deployments on a real local stack: Prefect server, SeaweedFS store, one process worker per pool.

One stack serves the module (starting it is the expensive part). The runs build on each other:
the first run trains everything (one training child fails once and is retried by the parent), the
second forces the last stage, fails, and is resumed with `prefect flow-run retry`, the annealing
deployment then runs twice without training.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
CRON = "30 4 * * 0"

RECIPE: dict[str, Any] = {
    "name": "deploy-test",
    "description": "two tiny stages for the deployment tests",
    "base_model": {
        "name": "tiny-smollm2",
        "source": {
            "kind": "tiny",
            "vocab_size": 1024,
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 4,
            "n_query_groups": 2,
            "intermediate_size": 128,
            "block_size": 128,
            "rope_base": 10000.0,
            "seed": 0,
        },
    },
    "corpora": [
        {
            "name": "sample-vi",
            "lang": "vi",
            "role": "main",
            "source": {"kind": "sample", "docs": 60, "val_docs": 8},
        },
        {
            "name": "sample-en",
            "lang": "en",
            "role": "main",
            "source": {"kind": "sample", "docs": 40, "val_docs": 8},
        },
        {
            "name": "sample-code",
            "lang": "code",
            "role": "main",
            "source": {"kind": "sample", "docs": 12, "val_docs": 4},
        },
        {
            "name": "sample-vi-annealing",
            "lang": "vi",
            "role": "annealing",
            "source": {"kind": "sample", "docs": 20, "val_docs": 4, "seed": 7},
        },
    ],
    "tokenizer": {"target_vocab_size": 1152, "train_languages": ["vi"]},
    "embedding_init": {"method": "subword-mean"},
    "data": {"val_fraction": 0.05, "dedup": True, "near_dedup": False},
    "mixtures": {
        "main": {"vi": 0.55, "en": 0.40, "code": 0.05},
        "annealing": {"vi": 0.32, "en": 0.25, "code": 0.03, "annealing": 0.40},
    },
    "stage_defaults": {
        "global_batch": 4,
        "micro_batch": 2,
        "seq_len": 32,
        "warmup_steps": 1,
        "precision": "32-true",
        "checkpoint_interval": 2,
        "eval_interval": 100,
        "eval_sequences": 1,
        "eval_at_start": False,
        "mixture": "main",
    },
    "stages": [
        {"name": "eeve-6", "trainable": "all", "lr": 2.0e-3, "min_lr": 1.0e-4, "max_tokens": 768},
        {
            "name": "annealing",
            "trainable": "all",
            "lr": 1.0e-3,
            "min_lr": 0.0,
            "schedule": "linear",
            "max_tokens": 768,
            "mixture": "annealing",
        },
    ],
    "eval": {"max_docs": 4, "seq_len": 64, "languages": ["vi", "en"]},
    "export": {"name": "deploy-test", "dtype": "float32"},
    "compute": {"accelerator": "cpu", "devices": 1},
    "logging": {"artifact_interval": 2},
}
# In the workers' environment only (never in a parameter or job variable): it must show up nowhere.
WANDB_KEY = "wandb-key-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The local stack with the project's deployments (one `prefect deploy`)."""
    from prefect.settings import temporary_settings

    from infra.stack import PREFECT_FILE, Stack

    root = tmp_path_factory.mktemp("stack")
    prefect_file = root / "prefect.yaml"
    prefect_file.write_text(PREFECT_FILE.read_text())
    st = Stack(
        root=root,
        worker_poll_seconds=1,
        annealing_cron=CRON,
        prefect_file=prefect_file,
        extra_env={"VINASMOL_WORK_DIR": str(root / "work"), "WANDB_API_KEY": WANDB_KEY},
    )
    st.recipe = root / "deploy-test.yaml"  # type: ignore[attr-defined]
    st.recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))  # type: ignore[attr-defined]
    st.timing_log = root / "timing.jsonl"  # type: ignore[attr-defined]
    st.up()
    try:
        with temporary_settings(st.api_settings()):
            yield st
    finally:
        st.down()


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait(run_id: Any, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    with _client() as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, (
                f"flow run {run.name} still {run.state.name} after {timeout} s"
            )
            time.sleep(1)


def _start(name: str, parameters: dict[str, Any], env: dict[str, str]) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(
        name, parameters=parameters, job_variables={"env": env}, timeout=0, as_subflow=False
    )


def _children(parent_id: Any, deployment: str = "train-stage") -> list[Any]:
    """Training child runs whose parent task run belongs to `parent_id`, oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    with _client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
        )
        mine = []
        for run in runs:
            if (
                run.parent_task_run_id
                and client.read_task_run(run.parent_task_run_id).flow_run_id == parent_id
            ):
                mine.append(run)
    return sorted(mine, key=lambda r: r.created)


def _logs(run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200
        )
    return [log.message for log in logs]


def _executed_steps(stack: Any, run_id: Any) -> list[str]:
    """Task-run names of the steps that executed (not loaded from cache) in a flow run."""
    from tasks.common import read_timing_log

    rows = read_timing_log(stack.timing_log, str(run_id))
    with _client() as client:
        return sorted(client.read_task_run(r["task_run_id"]).name for r in rows if r["task_run_id"])


def _env(stack: Any, **extra: str) -> dict[str, str]:
    return {"VINASMOL_TIMING_LOG": str(stack.timing_log), **extra}


def _artifacts(run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )


def _s3_store(stack: Any) -> Any:
    """The stack's S3 store, opened with the credentials its workers get."""
    from vinasmol_core.store import ArtifactStore

    env = stack.store_env()
    return ArtifactStore(
        env["VINASMOL_STORE"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
    )


def _cli_retry(stack: Any, run_id: Any) -> None:
    """What the UI's Retry does: `prefect flow-run retry` schedules the run again for a worker."""
    cli_env = {**os.environ, **stack.client_env()}
    res = subprocess.run(
        [str(REPO / ".venv/bin/prefect"), "flow-run", "retry", str(run_id)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def full_cpt(stack: Any) -> Any:
    """A `vinasmol/full-cpt` run whose eeve-6 child fails at step 3 and is retried by the parent."""
    run = _start("vinasmol/full-cpt", {"recipe": str(stack.recipe)}, _env(stack, VINASMOL_FAIL_AT="eeve-6:3"))
    return _wait(run.id)


def test_full_cpt_runs_through_workers_and_retries_a_failed_child(stack: Any, full_cpt: Any) -> None:
    run = full_cpt
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    assert run.work_pool_name == "cpu"

    children = _children(run.id)
    by_name = {c.name: c for c in children}
    assert set(by_name) == {"eeve-6-attempt-1", "eeve-6-attempt-2", "annealing-attempt-1"}, sorted(by_name)
    assert all(c.work_pool_name == "cuda" for c in children)
    assert by_name["eeve-6-attempt-1"].state.type.value in ("FAILED", "CRASHED")
    assert by_name["eeve-6-attempt-2"].state.is_completed()
    assert by_name["annealing-attempt-1"].state.is_completed()
    assert any("resumed from step 2" in m for m in _logs(by_name["eeve-6-attempt-2"].id))
    # a new idempotency key per attempt; fault injection applies to the first attempt only
    assert by_name["eeve-6-attempt-1"].idempotency_key == f"{run.id}/eeve-6/attempt-1"
    assert by_name["eeve-6-attempt-2"].idempotency_key == f"{run.id}/eeve-6/attempt-2"
    assert by_name["eeve-6-attempt-1"].parameters["job"]["fail_at_step"] == 3
    assert by_name["eeve-6-attempt-2"].parameters["job"]["fail_at_step"] is None

    # the parent mirrors each child's progress and links it
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    progress = [a for a in arts if a.type == "progress"]
    assert len(progress) >= 2 and all(float(a.data) == 100.0 for a in progress)
    links = [a for a in arts if a.type == "markdown" and "flow-run" in str(a.data)]
    assert links

    # the export is in the S3 store
    store = _s3_store(stack)
    assert store.get_manifest("runs/deploy-test/eeve-6").extra["resumed_from_step"] == 2
    export = store.get_manifest("latest/deploy-test/export")
    assert export.format == "hf" and "config.json" in export.files
    import s3fs

    env = stack.store_env()
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
    )
    sha = export.files["config.json"].sha256
    assert fs.exists(f"vinasmol/store/blobs/{sha[:2]}/{sha}")


def _train_loss_points(markdown: str) -> int:
    """The points of the training-loss line in a curves artifact's first chart (its SVG read back)."""
    import base64
    import re
    import xml.etree.ElementTree as ET

    blob = re.search(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert blob, markdown[:400]
    svg = ET.fromstring(base64.b64decode(blob.group(1)))
    lines = svg.iter("{http://www.w3.org/2000/svg}polyline")
    [line] = [p for p in lines if p.get("data-label") == "train loss"]
    return len(line.get("points").split())


def test_stage_child_runs_keep_their_curves_and_csv_logs(stack: Any, full_cpt: Any) -> None:
    """Each training child run has the keyed curves artifact, a version every 2 steps and at the end,
    the last with a point for every logged step (the resumed child's too); the parent has copies;
    the final checkpoint's CSV log has one row per logged step."""
    import csv
    import io

    by_name = {c.name: c for c in _children(full_cpt.id)}
    steps = 768 // (4 * 32)
    for name, stage, expected in (
        ("eeve-6-attempt-2", "eeve-6", [4, 6, 6]),  # resumed at step 2: versions at 4, 6 and the end
        ("annealing-attempt-1", "annealing", [2, 4, 6, 6]),
    ):
        arts = sorted(
            (a for a in _artifacts(by_name[name].id) if a.key == f"curves-{stage}"), key=lambda a: a.created
        )
        assert [_train_loss_points(a.data) for a in arts] == expected, name
        assert "(finished)" in arts[-1].data and f"| step | {steps} / {steps} |" in arts[-1].data
    parent = {a.key for a in _artifacts(full_cpt.id) if a.type == "markdown"}
    assert {"curves-eeve-6", "curves-annealing"} <= parent

    store = _s3_store(stack)
    for stage in ("eeve-6", "annealing"):
        manifest = store.get_manifest(f"runs/deploy-test/{stage}")
        assert "logs/csv/metrics.csv" in manifest.files
        assert any(p.startswith("logs/tensorboard/events.out.tfevents") for p in manifest.files)
        text = (store.fetch(manifest.digest) / "logs" / "csv" / "metrics.csv").read_text()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), stage
        assert all(r["loss"] and r["lr"] and r["tokens_per_s"] for r in rows)


def test_ui_retry_of_a_failed_parent_resumes(stack: Any) -> None:
    env = _env(stack, VINASMOL_FAIL_AT="annealing:3", VINASMOL_STAGE_ATTEMPTS="1")
    run = _start("vinasmol/full-cpt", {"recipe": str(stack.recipe), "force": ["annealing"]}, env)
    run = _wait(run.id)
    assert run.state.type.value == "FAILED", run.state.name
    assert "retry the run" in (run.state.message or ""), run.state.message
    assert [c.name for c in _children(run.id)] == ["annealing-attempt-1"]

    _cli_retry(stack, run.id)
    run = _wait(run.id)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    assert run.run_count >= 2

    children = _children(run.id)
    assert [c.name for c in children] == ["annealing-attempt-1", "annealing-attempt-2"]
    assert children[1].state.is_completed()
    assert any("resumed from step 2" in m for m in _logs(children[1].id))
    store = _s3_store(stack)
    assert store.get_manifest("runs/deploy-test/annealing").extra["resumed_from_step"] == 2
    executed = _executed_steps(stack, run.id)
    assert "train-stage-eeve-6" not in executed and "train-tokenizer" not in executed, executed
    assert executed.count("train-stage-annealing") >= 1


def test_annealing_deployment_is_scheduled_and_caches(stack: Any, full_cpt: Any) -> None:
    with _client() as client:
        dep = client.read_deployment_by_name("vinasmol/annealing")
    assert [s.schedule.cron for s in dep.schedules] == [CRON]
    assert dep.parameters["from_stage"] == "annealing"

    params = {"recipe": str(stack.recipe), "start_ref": "runs/deploy-test/eeve-6"}
    runs = []
    for _ in range(2):
        run = _wait(_start("vinasmol/annealing", params, _env(stack)).id)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
        runs.append(run)
    second = runs[1]
    assert _children(second.id) == []
    executed = _executed_steps(stack, second.id)
    assert not [s for s in executed if s.startswith("train-stage")], executed


def test_sweep_deployment_runs_proxy_runs_as_parallel_children(stack: Any) -> None:
    """`vinasmol/sweep`: four proxy runs of eeve-6, two at a time, as child runs on the CUDA pool;
    the report artifact holds the fit and the chosen `--set` lines."""
    sweep_file = stack.root / "stack.sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "stack", "stage": "eeve-6", "runs": 4, "tokens_per_run": 256, "parallel": 2,
        "search": {"mixture": {"vary": ["vi", "en"]}, "lr": {"low": 5e-4, "high": 5e-3}},
        "check_seeds": [],
    }))
    params = {"recipe": str(stack.recipe), "sweep_file": str(sweep_file)}
    run = _wait(_start("vinasmol/sweep", params, _env(stack)).id)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    children = _children(run.id)
    assert sorted(c.name for c in children) == [f"eeve-6-p0{i}-attempt-1" for i in range(4)]
    assert all(c.state.is_completed() and c.work_pool_name == "cuda" for c in children)
    first, second = children[0], children[1]
    assert second.start_time < first.end_time, "the first two proxy runs did not overlap"
    report = [a for a in _artifacts(run.id) if a.key == "sweep-stack"]
    assert report and "Predicted best" in str(report[0].data)
    assert "--set 'stages.eeve-6." in str(report[0].data)
    assert any(a.key == "sweep-stack-runs" and a.type == "table" for a in _artifacts(run.id))


def test_two_gpu_child_run_renders_through_prefect(stack: Any) -> None:
    """A stage with devices=2 on a Kubernetes pool: its child run's job requests nvidia.com/gpu: 2."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from infra.kubernetes import load_template, render_job_manifest
    from tasks.dispatch import _job_variables

    template = load_template()
    with _client() as client:
        client.create_work_pool(
            WorkPoolCreate(name="cuda-k8s", type="kubernetes", base_job_template=template)
        )
        flow_id = client.create_flow_from_name("vinasmol-stage")
        client.create_deployment(
            flow_id=flow_id,
            name="train-stage-k8s",
            work_pool_name="cuda-k8s",
            entrypoint="flows/stage.py:vinasmol_stage",
            paused=True,
        )
    job_vars = _job_variables("vinasmol-stage/train-stage-k8s", 2)
    assert job_vars == {"gpu_count": 2}
    assert _job_variables("vinasmol-stage/train-stage", 2) == {}  # the local process pool has no GPUs

    from prefect.deployments import run_deployment

    extra = {"node_selector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}
    child = run_deployment(
        "vinasmol-stage/train-stage-k8s",
        parameters={"job": {}},
        timeout=0,
        as_subflow=False,
        job_variables={**job_vars, **extra},
    )
    with _client() as client:
        stored = client.read_flow_run(child.id).job_variables
        client.delete_flow_run(child.id)
    pod = render_job_manifest(stored, template)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == extra["tolerations"]


def test_heartbeat_automation_is_registered(stack: Any) -> None:
    with _client() as client:
        (automation,) = client.read_automations_by_name("vinasmol-crash-silent-runs")
    assert automation.enabled and automation.trigger.posture.value == "Proactive"
    assert automation.trigger.within.total_seconds() == 3 * stack.heartbeat_seconds


def test_no_credential_leaks(stack: Any, full_cpt: Any) -> None:
    """Scan logs, parameters, job variables, artifacts, results, blocks and the stack's log files."""
    creds = stack.credentials()
    secrets = [creds["access_key"], creds["secret_key"], WANDB_KEY, stack.api_auth_string().split(":", 1)[1]]
    seen: list[tuple[str, str]] = []
    with _client() as client:
        runs = client.read_flow_runs(limit=200)
        ran = {r.id for r in runs}
        assert full_cpt.id in ran and all(c.id in ran for c in _children(full_cpt.id))
        for run in runs:
            seen.append((f"parameters of {run.name}", json.dumps(run.parameters, default=str)))
            seen.append((f"job variables of {run.name}", json.dumps(run.job_variables, default=str)))
            if run.state is not None:
                seen.append((f"state of {run.name}", f"{run.state.message} {run.state.data}"))
        from prefect.client.schemas.filters import LogFilter

        offset = 0
        while True:
            logs = client.read_logs(log_filter=LogFilter(), limit=200, offset=offset)
            seen.extend(("log", log.message) for log in logs)
            if len(logs) < 200:
                break
            offset += 200
        seen.extend(("artifact", f"{a.data} {a.description}") for a in client.read_artifacts())
        seen.extend(("block", json.dumps(b.data, default=str)) for b in client.read_block_documents())
    import s3fs

    env = stack.store_env()
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
    )
    results = fs.find("vinasmol/store/prefect-results")
    assert results, "task results are stored in the store"
    seen.extend(("result", fs.cat(path).decode(errors="replace")) for path in results)
    seen.extend(("stack log", p.read_text(errors="replace")) for p in (stack.root / "logs").glob("*.log"))
    leaks = [where for where, text in seen for s in secrets if s in text]
    assert not leaks, leaks
