"""The `vinasmol` entry point: the library's commands plus the pipeline's (run, demo, retry, recipe).

Prefect is imported only inside the pipeline commands, after the demo has set up its environment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from vinasmol_core.cli import app, run_app
from vinasmol_core.common.errors import VinaSmolError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO_ROOT / "recipes" / "tiny-cpu.yaml"

recipe_app = typer.Typer(no_args_is_help=True, help="recipe commands: schema, check")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("schema")
def recipe_schema_cmd() -> None:
    """Print the JSON schema of a recipe."""
    from vinasmol_core.plan.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))


HUB_MIRROR_HELP = "folder in the hub's layout (<owner>/<name>/) to read hub ids from ($VINASMOL_HUB_MIRROR)"


@recipe_app.command("check")
def recipe_check_cmd(
    file: Path = typer.Argument(..., help="recipe YAML"),
    hub_mirror: str | None = typer.Option(None, "--hub-mirror", help=HUB_MIRROR_HELP),
    offline: bool = typer.Option(False, "--offline", help="do not ask the hub (hub sources: not checked)"),
    store: str | None = typer.Option(
        None, "--store", help="artifact store URL whose prepared datasets give the real tokens per source "
        "(default: $VINASMOL_STORE)"),
) -> None:
    """Validate a recipe (errors name the field), check that every local file exists and every hub
    source resolves (on the hub when online, in the mirror when given), and print the planned
    training tokens per stage and per source, with the tokens each source really kept once the data
    step has published a dataset to the store. Exit 1 on a missing file or an unknown hub id."""
    from vinasmol_core.hub import mirror_root
    from vinasmol_core.plan.preflight import FAILED, check_inputs, format_plan, kept_tokens, plan_tokens
    from vinasmol_core.plan.recipe import load_recipe
    from vinasmol_core.store.layout import default_store_url

    recipe = load_recipe(file)
    checks = check_inputs(recipe, mirror_root(hub_mirror), network=not offline)
    for check in checks:
        print(f"{'ok' if check.status == 'ok' else check.status}: {check.line}")
    print("\n".join(format_plan(recipe, plan_tokens(recipe), kept_tokens(store or default_store_url()))))
    if recipe.compute.gpu is not None:  # the plan's summary for the GPU the recipe is for
        from vinasmol_core.plan.gpu_plan import does_not_fit, find_gpu, plan_recipe

        device = find_gpu(recipe.compute.gpu, recipe.compute.gpus)
        plans = plan_recipe(recipe, device, recipe.compute.nodes * recipe.compute.devices)
        for p in plans:
            print(f"plan: {p.stage}: {p.parts.total / 2**30:,.2f} GiB per GPU at micro-batch {p.micro_batch} "
                  f"(largest that fits: {p.max_micro_batch or '-'}), {p.hours:,.1f} h")
            if not p.fits:
                print(does_not_fit(p, device))
    failed = [c for c in checks if c.status in FAILED]
    if failed:
        raise VinaSmolError(f"{file}: {len(failed)} input(s) missing or unknown (listed above)")
    print(f"ok: {file}: recipe {recipe.name!r}, steps: {', '.join(recipe.step_names())}")


@app.command("plan")
def plan_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    gpu: str | None = typer.Option(None, "--gpu", help="h100-80gb, h200-141gb, a100-40gb, a100-80gb, l4-24gb "
                                   "(default: the recipe's compute.gpu)"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="nodes"),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", min=1, help="GPUs per node"),
    mfu: float = typer.Option(0.4, "--mfu", min=0.01, max=1.0, help="model FLOPs utilisation for the hours"),
    overrides: list[str] = typer.Option([], "--set", help="PATH=VALUE recipe override; repeatable"),
) -> None:
    """Per stage, before anything is downloaded: peak memory per GPU in parts, the largest micro-batch
    that fits with 10% to spare, tokens/s and hours at a stated MFU, GPU-hours. Exit 1 with a "does
    not fit" line naming the stage and the part when a stage does not fit."""
    from vinasmol_core.plan.gpu_plan import find_gpu, format_plan, plan_recipe
    from vinasmol_core.plan.recipe import load_recipe

    parsed = load_recipe(recipe, overrides)
    name = gpu or parsed.compute.gpu
    if name is None:
        raise VinaSmolError("--gpu: name the GPU to plan for (the recipe sets no compute.gpu)")
    device = find_gpu(name, parsed.compute.gpus)
    plans = plan_recipe(parsed, device, nodes * gpus_per_node, mfu)
    print("\n".join(format_plan(plans, device, nodes, gpus_per_node, mfu)))
    misfits = [p.stage for p in plans if not p.fits]
    if misfits:
        raise VinaSmolError(
            f"{recipe}: stage(s) {', '.join(misfits)} do not fit {nodes} x {gpus_per_node} {name}"
        )


def check_plan(recipe: Path, overrides: list[str], force_plan: bool) -> None:
    """Before a run: refuse a recipe whose stages do not fit the GPU its `compute.gpu` names, on
    `compute.nodes` x `compute.devices` of them (unless `force_plan`)."""
    from vinasmol_core.plan.gpu_plan import does_not_fit, find_gpu, plan_recipe
    from vinasmol_core.plan.recipe import load_recipe

    parsed = load_recipe(recipe, overrides)
    if parsed.compute.gpu is None:
        return
    device = find_gpu(parsed.compute.gpu, parsed.compute.gpus)
    misfits = [p for p in plan_recipe(parsed, device, parsed.compute.nodes * parsed.compute.devices)
               if not p.fits]
    if misfits and not force_plan:
        lines = "\n".join(does_not_fit(p, device) for p in misfits)
        raise VinaSmolError(f"{recipe}: the plan does not fit compute.gpu={parsed.compute.gpu} "
                            f"(`vinasmol plan` shows it; --force-plan runs anyway):\n{lines}")


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
    overrides: list[str] | None = None,
    smoke: bool = False,
    hub_mirror: str | None = None,
) -> dict:
    if before_flow is None and _OWN_SERVER is not None:
        before_flow = _OWN_SERVER.wait_ready
    from flows.pipeline import plan_run, vinasmol

    # Every input is checked before a flow run exists, so bad input costs nothing.
    plan = plan_run(recipe, store, from_stage, force, start_ref, stage_runner, hub_mirror=hub_mirror,
                    overrides=overrides, smoke=smoke)
    if before_flow is not None:
        before_flow()
    state = vinasmol(
        recipe=str(recipe),
        store=store,
        from_stage=from_stage,
        force=force or None,
        start_ref=start_ref,
        stage_runner=stage_runner,
        overrides=overrides or None,
        smoke=smoke,
        hub_mirror=plan.hub_mirror,
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
    hub_mirror: str | None = typer.Option(None, "--hub-mirror", help=HUB_MIRROR_HELP),
    overrides: list[str] = typer.Option(
        [], "--set", help="PATH=VALUE recipe override, e.g. stages.eeve-6.lr=2e-4; repeatable"
    ),
    smoke: bool = typer.Option(
        False, "--smoke", help="every step on a small slice (store namespace smoke/); projects the full run"
    ),
    force_plan: bool = typer.Option(
        False, "--force-plan", help="run even if the plan does not fit the recipe's compute.gpu"
    ),
) -> None:
    """Run the pipeline of a recipe as a Prefect flow; print the final checkpoint and HF export refs.
    Every input is checked first: a missing file or an unreachable hub source stops it before any step,
    and so does a recipe whose plan does not fit the GPU `compute.gpu` names (`vinasmol plan`)."""
    check_plan(recipe, overrides, force_plan or smoke)
    result = _run_flow(recipe, store, from_stage, force, start_ref, stage_runner, hub_mirror=hub_mirror,
                       overrides=overrides, smoke=smoke)
    _print_result(result)


@app.command("sweep")
def sweep_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    sweep_file: Path = typer.Argument(..., help="sweep YAML: stage, proxy, search space, runs, objective"),
    store: str | None = typer.Option(
        None, "--store", help="artifact store URL (default: recipe, $VINASMOL_STORE)"
    ),
    stage_runner: str | None = typer.Option(None, "--stage-runner", help="inline | deployment"),
    hub_mirror: str | None = typer.Option(None, "--hub-mirror", help=HUB_MIRROR_HELP),
    overrides: list[str] = typer.Option([], "--set", help="PATH=VALUE recipe override; repeatable"),
    out: Path | None = typer.Option(
        None, "--out", help="recipe file with the chosen values (default: <recipe>-<sweep>.yaml here)"
    ),
) -> None:
    """Proxy runs of one stage over a sweep file's search space, a regression from configuration to
    objective, its predicted best checked by training it; writes a recipe with the chosen values."""
    from flows.pipeline import plan_run
    from flows.sweep import sweep
    from vinasmol_core.plan.sweep import check_sweep, load_sweep, patched_recipe_text

    spec = load_sweep(sweep_file)
    plan = plan_run(recipe, store, stage_runner=stage_runner, hub_mirror=hub_mirror, overrides=overrides)
    check_sweep(plan.recipe, spec)
    target = out or Path(f"{recipe.stem}-{spec.name}.yaml")
    if _OWN_SERVER is not None:
        _OWN_SERVER.wait_ready()
    state = sweep(recipe=str(recipe), sweep_file=str(sweep_file), store=store, stage_runner=stage_runner,
                  hub_mirror=plan.hub_mirror, overrides=overrides or None, return_state=True)
    if not state.is_completed():
        run_id = state.state_details.flow_run_id
        raise VinaSmolError(f"sweep flow run {run_id} ended {state.name}: {state.message}")
    result = state.result()
    print(result["markdown"])
    text = patched_recipe_text(recipe, [*overrides, *result["set_lines"]])
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    print(f"sweep: recipe with the chosen values: {target} (flow run {state.state_details.flow_run_id})")


@app.command("retry")
def retry_cmd(flow_run_id: str = typer.Argument(..., help="id of a finished vinasmol flow run")) -> None:
    """Re-run a failed pipeline run under the same run id: finished steps load from cache and the
    failed training stage resumes from its newest partial checkpoint."""
    from flows.pipeline import retry_flow_run

    if _OWN_SERVER is not None:
        _OWN_SERVER.wait_ready()
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


@app.command("prefect-template")
def prefect_template_cmd() -> None:
    """Prepare the empty Prefect database that new demo folders start from (`make` runs this at
    install): Prefect's migrations and block registration, done once per Prefect version."""
    from flows.local_server import build_database_template

    path, built = build_database_template()
    print(f"ok: {path}" + ("" if built else " exists"))


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
    from flows.local_server import LocalPrefectServer

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


# The Prefect server a `run` or `retry` started for itself (no Prefect API configured), or None.
_OWN_SERVER: Any = None


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def configured_api_url() -> str | None:
    """The Prefect API this process would use: $PREFECT_API_URL, else the active profile's (read
    without importing Prefect, whose settings are fixed at import)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    profile = data.get("profiles", {}).get(os.environ.get("PREFECT_PROFILE") or data.get("active", ""), {})
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return str(url) if url else None


def _with_own_server() -> None:
    """`main` with a Prefect server of this command's own in Prefect's home (the database Prefect's
    temporary server would use), on a free 127.0.0.1 port. Unlike Prefect's temporary server it dies
    with this process, even a SIGKILLed one, so an interrupted run leaves nothing behind."""
    global _OWN_SERVER
    from flows.local_server import LocalPrefectServer

    _OWN_SERVER = LocalPrefectServer(prefect_home())
    os.environ["PREFECT_API_URL"] = _OWN_SERVER.api_url
    try:
        main()
    finally:
        _OWN_SERVER.stop()


def console() -> None:
    """The `vinasmol` console script: `main`, ending without the interpreter's slow teardown. `run`
    and `retry` without a configured Prefect API start a server of their own (`_with_own_server`)."""
    from vinasmol_core.common.process_exit import run_entry_point

    pipeline = len(sys.argv) > 1 and sys.argv[1] in ("run", "retry", "sweep") and "--help" not in sys.argv
    run_entry_point(_with_own_server if pipeline and configured_api_url() is None else main)
