"""The `vinasmol` entry point: the library's commands plus the pipeline's (run, demo, retry, recipe).

Prefect is imported only inside the pipeline commands, after the demo has set up its environment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer

from vinasmol_core.cli import app, run_app
from vinasmol_core.errors import VinaSmolError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO_ROOT / "recipes" / "tiny-cpu.yaml"

recipe_app = typer.Typer(no_args_is_help=True, help="recipe commands: schema, check")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("schema")
def recipe_schema_cmd() -> None:
    """Print the JSON schema of a recipe."""
    from vinasmol_core.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))


@recipe_app.command("check")
def recipe_check_cmd(file: Path = typer.Argument(..., help="recipe YAML")) -> None:
    """Validate a recipe; errors name the field."""
    from vinasmol_core.recipe import load_recipe

    recipe = load_recipe(file)
    print(f"ok: {file}: recipe {recipe.name!r}, steps: {', '.join(recipe.step_names())}")


def _print_result(result: dict, export_dir: Path | None = None) -> None:
    print(result["summary_markdown"])
    print(f"final checkpoint: {result['final_checkpoint']['ref']} ({result['final_checkpoint']['digest']})")
    print(f"HF export: {result['export']['ref']} ({result['export']['digest']})")
    if export_dir is not None:
        print(f"HF export folder: {export_dir}")


def _run_flow(
    recipe: Path,
    store: str | None,
    from_stage: str | None,
    force: list[str],
    start_ref: str | None,
    stage_runner: str | None,
    before_flow: Callable[[], None] | None = None,
) -> dict:
    from flows.pipeline import plan_run, vinasmol

    # Every input is checked before a flow run exists, so bad input costs nothing.
    plan_run(recipe, store, from_stage, force, start_ref, stage_runner)
    if before_flow is not None:
        before_flow()
    state = vinasmol(
        recipe=str(recipe),
        store=store,
        from_stage=from_stage,
        force=force or None,
        start_ref=start_ref,
        stage_runner=stage_runner,
        return_state=True,
    )
    if not state.is_completed():
        try:
            state.result()
        except VinaSmolError:
            raise
        except Exception as exc:
            raise VinaSmolError(f"flow run {state.state_details.flow_run_id} {state.name}: {exc}") from None
        raise VinaSmolError(f"flow run {state.state_details.flow_run_id} ended {state.name}")
    result = state.result()
    result["flow_run_id"] = str(state.state_details.flow_run_id)
    return result


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    store: str | None = typer.Option(
        None, "--store", help="artifact store URL (default: recipe, $VINASMOL_STORE)"
    ),
    from_stage: str | None = typer.Option(None, "--from-stage", help="re-run this step and everything after"),
    force: list[str] = typer.Option([], "--force", help="step to re-run (with everything after); repeatable"),
    start_ref: str | None = typer.Option(None, "--start-ref", help="start --from-stage from this checkpoint"),
    stage_runner: str | None = typer.Option(None, "--stage-runner", help="inline | deployment"),
) -> None:
    """Run the pipeline of a recipe as a Prefect flow; print the final checkpoint and HF export refs."""
    result = _run_flow(recipe, store, from_stage, force, start_ref, stage_runner)
    _print_result(result)


@app.command("retry")
def retry_cmd(flow_run_id: str = typer.Argument(..., help="id of a finished vinasmol flow run")) -> None:
    """Re-run a failed pipeline run under the same run id: finished steps load from cache and the
    failed training stage resumes from its newest partial checkpoint."""
    from flows.pipeline import retry_flow_run

    state = retry_flow_run(flow_run_id)
    if not state.is_completed():
        raise VinaSmolError(f"flow run {flow_run_id} ended {state.name}: {state.message}")
    _print_result(state.result())


def demo_environment(demo_dir: Path) -> dict[str, str]:
    """Environment of the demo: Prefect's home, the work folder and quiet libraries under the demo folder."""
    demo_dir = demo_dir.resolve()
    return {
        "PREFECT_HOME": str(demo_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        "VINASMOL_WORK_DIR": str(demo_dir / "work"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "VINASMOL_TIMING_LOG": os.environ.get("VINASMOL_TIMING_LOG", str(demo_dir / "timing.jsonl")),
    }


class LocalPrefectServer:
    """A Prefect API server for one command, on a free loopback port, its SQLite database in
    PREFECT_HOME. Started before Prefect, torch and the pipeline are imported, so its boot (several
    seconds) overlaps ours instead of following it as Prefect's ephemeral server would."""

    def __init__(self, home: Path, startup_timeout: float = 180.0) -> None:
        import subprocess

        from vinasmol_core.seaweed import free_ports

        port = free_ports(1)[0]
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.log = home / "server.log"
        self.startup_timeout = startup_timeout
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--no-services", "--no-ui"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    def wait_ready(self) -> None:
        import httpx

        while True:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise VinaSmolError(f"the local Prefect server exited while starting; see {self.log}")
            if time.monotonic() - self.started > self.startup_timeout:
                self.stop()
                raise VinaSmolError("the local Prefect server did not answer within "
                                    f"{self.startup_timeout:.0f} s; see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@app.command("demo")
def demo_cmd(
    demo_dir: Path = typer.Option(Path("demo-store"), "--dir", help="demo folder (store, Prefect home)"),
    recipe: Path = typer.Option(DEMO_RECIPE, "--recipe", help="recipe to run"),
) -> None:
    """recipes/tiny-cpu.yaml end to end with a Prefect server of its own; a second run is fully cached."""
    t0 = time.perf_counter()
    try:
        (demo_dir / "store").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VinaSmolError(f"demo folder {demo_dir}: cannot create it ({exc.strerror})") from None
    os.environ.update(demo_environment(demo_dir))
    server = LocalPrefectServer(demo_dir.resolve() / "prefect")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        store_url = "file://" + str((demo_dir / "store").resolve())
        result = _run_flow(recipe, store_url, None, [], None, "inline", before_flow=server.wait_ready)
    finally:
        server.stop()

    from vinasmol_core.store import ArtifactStore

    export_dir = (demo_dir / "hf-export").resolve()
    src = ArtifactStore(store_url).fetch(result["export"]["digest"])
    if export_dir.exists():
        shutil.rmtree(export_dir)
    shutil.copytree(src, export_dir)
    for path in export_dir.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    _print_result(result, export_dir)
    print(
        f"demo: flow run {result['flow_run_id']}, {time.perf_counter() - t0:.1f} s; "
        f"store {store_url}; load the export with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(export_dir)!r})"
    )


def main() -> None:
    run_app(app)
