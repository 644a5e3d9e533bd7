"""Screenshots of the Prefect UI while a run is watched: the local stack (the command `make up` runs,
`python -m infra.stack up`, in a stack folder of its own on a free port), the tiny recipe through
`vinasmol/full-cpt` (each stage a child run of `vinasmol-stage/train-stage` on the `cuda` pool), then
headless Chromium on the Artifacts tab and the rendered artifacts of the parent run and of one stage's
child run.

    python bench/ui_shots.py [--out DIR] [--recipe recipes/tiny-cpu.yaml] [--stage eeve-6] [--keep-stack]

Needs Debian's Chromium (`sudo apt-get install -y chromium`) or `--chromium PATH`; without it the
script says so and exits 2 before starting anything. Ends with one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def find_chromium(given: str | None) -> str | None:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_cmd(command: str, env: dict[str, str], port: int) -> None:
    cmd = [sys.executable, "-m", "infra.stack", command, "--port", str(port), "--no-profile"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(res.stdout.strip())
    if res.returncode != 0:
        raise SystemExit(f"ui_shots: `{' '.join(cmd[1:])}` failed ({res.returncode}):\n{res.stderr[-3000:]}")


def run_parent(recipe: Path, timeout: float) -> Any:
    """Start vinasmol/full-cpt with the stages as child runs; wait for it to end."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment(
        "vinasmol/full-cpt", parameters={"recipe": str(recipe), "stage_runner": "deployment"}, timeout=0
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                state = run.state.name if run.state else "?"
                raise SystemExit(f"ui_shots: flow run {run.name} still {state} after {timeout:.0f} s")
            time.sleep(2)


def stage_child(parent_id: Any, stage: str) -> Any:
    """The completed training child run of `stage` started by the parent run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{stage}-attempt-"))
        )
        for run in sorted(runs, key=lambda r: r.created, reverse=True):
            task_run = run.parent_task_run_id and client.read_task_run(run.parent_task_run_id)
            if task_run and task_run.flow_run_id == parent_id:
                return run
    raise SystemExit(f"ui_shots: no child run of stage {stage!r} under the parent run")


def artifact_id(run_id: Any, key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    mine = sorted((a for a in arts if a.key == key), key=lambda a: a.created)
    return mine[-1].id if mine else None


def screenshot(chromium: str, url: str, out: Path, height: int) -> bool:
    profile = tempfile.mkdtemp(prefix="ui-shots-chromium-")
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        f"--user-data-dir={profile}", f"--window-size=1400,{height}", "--virtual-time-budget=20000",
        "--hide-scrollbars", f"--screenshot={out}", url,
    ]
    try:
        subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out.is_file() and out.stat().st_size > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ui-shots"), help="PNGs and the stack folder")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-cpu.yaml")
    parser.add_argument("--stage", default="eeve-6", help="the stage whose child run is shown")
    parser.add_argument("--artifact-interval", type=int, default=4, help="steps between curves versions")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the run may take")
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running at the end")
    args = parser.parse_args()

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("ui_shots: Chromium not found. Install Debian's package: `sudo apt-get install -y chromium` "
              "(Ubuntu: the `chromium` snap, or Google Chrome), or pass --chromium PATH")
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(args.recipe.read_text())
    recipe.setdefault("logging", {})["artifact_interval"] = args.artifact_interval
    recipe_path = out / args.recipe.name
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    port = free_port()
    env = {**os.environ, "VINASMOL_STACK_DIR": str(out / "stack"), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    stack_cmd("up", env, port)
    t_up = time.perf_counter() - t0
    state = json.loads((out / "stack" / "stack.json").read_text())
    ui, api = state["ui_url"], state["api_url"]
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    auth = (out / "stack" / "prefect-auth").read_text().strip()
    shots: list[str] = []
    try:
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
            t1 = time.perf_counter()
            parent = run_parent(recipe_path, args.timeout)
            t_run = time.perf_counter() - t1
            child = stage_child(parent.id, args.stage)
            # the V2 UI (under /v2/) opens a flow run on the tab that `?tab=` names; the default UI
            # shows the run's graph with its artifacts marked, and renders an artifact by its id
            pages = [
                ("parent-artifacts", f"{ui}/v2/runs/flow-run/{parent.id}?tab=Artifacts", 1400),
                ("stage-artifacts", f"{ui}/v2/runs/flow-run/{child.id}?tab=Artifacts", 1400),
                ("stage-run", f"{ui}/runs/flow-run/{child.id}", 900),
            ]
            summary = artifact_id(parent.id, f"summary-{recipe['name']}")
            curves = artifact_id(child.id, f"curves-{args.stage}")
            if summary is not None:
                pages.append(("parent-summary", f"{ui}/artifacts/artifact/{summary}", 2400))
            if curves is not None:
                pages.append(("stage-curves", f"{ui}/artifacts/artifact/{curves}", 2600))
            for name, url, height in pages:
                png = out / f"{name}.png"
                if screenshot(chromium, url, png, height):
                    shots.append(png.name)
                else:
                    print(f"ui_shots: no screenshot of {url}")
    finally:
        if not args.keep_stack:
            stack_cmd("down", env, port)
    print(
        f"ui_shots: stack up {t_up:.0f} s, run {parent.name} {parent.state.name} in {t_run:.0f} s, "
        f"{len(shots)} screenshots in {out}: {', '.join(shots)}"
    )
    return 0 if parent.state.is_completed() and len(shots) == len(pages) else 1


if __name__ == "__main__":
    sys.exit(main())
