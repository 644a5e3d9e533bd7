"""The `vinasmol` flow against a real Prefect server, on a tiny recipe with a few steps per stage.

One module-scoped sequence of runs on one store, each test asserting one property of it:
1. a run with a failure injected at step 5 of eeve-6 fails; a retry of that flow run (same id)
   loads every finished step from cache, resumes eeve-6 from its step-4 checkpoint and completes;
2. a run that forces eeve-6 (so eeve-6 and everything after train uninterrupted) ends with the same
   weights as the interrupted-and-resumed run;
3. an unchanged rerun executes no step at all;
4. new annealing data re-runs only the annealing data, the annealing stage, its evaluation, export.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.common import read_timing_log
from tasks.train import FAIL_AT_ENV
from tests.cli_helpers import run_vinasmol
from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.common.steps import Step

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["eeve-3", "eeve-4", "eeve-6", "eeve-7", "context-extension", "annealing"]
STEPS_PER_STAGE = 6
FAIL_AT = 5  # checkpoints every 2 steps: the resumed stage starts at step 4


def write_test_recipe(path: Path, annealing_seed: int = 7) -> Path:
    """recipes/tiny-cpu.yaml made smaller: fewer documents, six optimizer steps per stage."""
    data = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    data["name"] = "tiny-test"
    for corpus in data["corpora"]:
        src = corpus["source"]
        src["docs"], src["val_docs"] = (24, 4) if corpus["lang"] == "code" else (80, 8)
        if corpus["role"] == "annealing":
            src["docs"], src["seed"] = 30, annealing_seed
    data["tokenizer"]["target_vocab_size"] = 1216
    data["stage_defaults"].update(
        checkpoint_interval=2, eval_interval=100, eval_sequences=1, eval_at_start=False
    )
    for stage in data["stages"]:
        gb = stage.get("global_batch", data["stage_defaults"]["global_batch"])
        seq = stage.get("seq_len", data["stage_defaults"]["seq_len"])
        stage["max_tokens"] = STEPS_PER_STAGE * gb * seq
    long, harness = data["eval"]["long"], data["eval"]["harness"]
    long.update(max_docs=2, languages=["code"], passkey_lengths=[256], depths=[0.0, 1.0])
    harness.update(after=["init", "annealing"], cloze=[{"lang": "vi", "items": 6}], limit=6)
    data["eval"] = {"max_docs": 4, "seq_len": 64, "languages": ["vi", "en", "code"], "long": long,
                    "harness": harness}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def executed(log: Path, flow_run_id: Any, since: float = 0.0) -> dict[str, bool]:
    """Task runs whose step function ran (cached steps never do): run name -> finished ok."""
    rows = read_timing_log(log, str(flow_run_id))
    return {r["name"]: r["ok"] for r in rows if r["started"] >= since}


class _Env:
    def __init__(self, **values: str) -> None:
        self.values, self.saved = values, {}

    def __enter__(self) -> _Env:
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def runs(prefect_server, tmp_path_factory) -> dict[str, Any]:
    import vinasmol_core.train.engine  # noqa: F401  (the in-process reference run uses it)
    from flows.pipeline import retry_flow_run, vinasmol

    base = tmp_path_factory.mktemp("pipeline")
    recipe = write_test_recipe(base / "recipe.yaml")
    store = "file://" + str(base / "store")
    log = base / "timing.jsonl"
    out: dict[str, Any] = {"base": base, "store": store, "log": log, "recipe": recipe}
    with _Env(VINASMOL_TIMING_LOG=str(log), VINASMOL_WORK_DIR=str(base / "work")):
        with _Env(**{FAIL_AT_ENV: f"eeve-6:{FAIL_AT}"}):
            failed = vinasmol(recipe=str(recipe), store=store, return_state=True)
        out["failed_state"] = failed
        run_id = failed.state_details.flow_run_id
        out["run_id"] = run_id
        out["first_attempt"] = executed(log, run_id)
        t_retry = time.time()
        retried = retry_flow_run(str(run_id))
        out["retry_state"] = retried
        out["retry_attempt"] = executed(log, run_id, since=t_retry)
        out["resumed"] = retried.result()

        again = vinasmol(recipe=str(recipe), store=store, return_state=True)
        out["again"] = again.result()
        out["again_id"] = again.state_details.flow_run_id
        out["again_steps"] = executed(log, again.state_details.flow_run_id)

        recipe2 = write_test_recipe(base / "recipe-new-annealing.yaml", annealing_seed=8)
        changed = vinasmol(recipe=str(recipe2), store=store, return_state=True)
        out["changed"] = changed.result()
        out["changed_steps"] = executed(log, changed.state_details.flow_run_id)

        weekly = vinasmol(
            recipe=str(recipe2),
            store=store,
            from_stage="annealing",
            start_ref="runs/tiny-test/context-extension",
            return_state=True,
        )
        out["weekly_steps"] = executed(log, weekly.state_details.flow_run_id)
        restarted = vinasmol(
            recipe=str(recipe2),
            store=store,
            from_stage="annealing",
            start_ref="runs/tiny-test/context-extension",
            force=["annealing"],
            return_state=True,
        )
        out["restarted"] = restarted.result()
        out["restarted_steps"] = executed(log, restarted.state_details.flow_run_id)
        out["flow_run_ids"] = [
            str(state.state_details.flow_run_id) for state in (failed, again, changed, weekly, restarted)
        ]
    return out


def uninterrupted_reference(recipe: Path, store: str, result: dict[str, Any]) -> list[str]:
    """eeve-6 and every stage after it, run in this process without interruption from the same
    eeve-4 checkpoint and datasets (fresh partial refs: nothing to resume from)."""
    from vinasmol_core.plan.recipe import load_recipe
    from vinasmol_core.train.engine import run_stage
    from vinasmol_core.train.spec import StageJob

    parsed = load_recipe(recipe)
    previous = result["checkpoints"][1]["digest"]
    digests = []
    for spec in parsed.stages[2:]:
        job = StageJob(
            spec=spec,
            init_checkpoint=previous,
            dataset=result["datasets"][parsed.stage_dataset(spec)],
            store_url=store,
            out_ref=f"reference/{spec.name}",
            partial_ref_prefix=f"reference/partial/{spec.name}",
        )
        previous = run_stage(job).digest
        digests.append(previous)
    return digests


def _store(runs: dict[str, Any]):
    from vinasmol_core.store import ArtifactStore

    return ArtifactStore(runs["store"])


def _weights(store, digest: str) -> dict[str, Any]:
    import torch

    path = store.fetch(digest) / "lit_model.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_pipeline_end_to_end_every_stage_and_loadable_export(runs) -> None:
    assert runs["failed_state"].is_failed()
    assert runs["retry_state"].is_completed()
    result = runs["resumed"]
    ran = {**runs["first_attempt"], **runs["retry_attempt"]}
    for name in [
        "fetch-base-model",
        "train-tokenizer",
        "merge-vocabulary",
        "prepare-data-main",
        "prepare-data-annealing",
        "init-embeddings",
        "convert-to-litgpt",
        "export",
        *(f"train-stage-{s}" for s in STAGES),
        *(f"evaluate-{s}" for s in STAGES),
    ]:
        assert ran.get(name) is True, f"{name} did not run to completion: {ran}"
    assert [c["stage"] for c in result["checkpoints"]] == STAGES
    assert all(c["step"] == STEPS_PER_STAGE for c in result["checkpoints"])
    assert set(result["bpb"]) == {"base", "init", *STAGES}
    assert all(set(v) == {"vi", "en", "code"} for v in result["bpb"].values())
    assert "base" in result["fertility_markdown"] and "extended" in result["fertility_markdown"]
    assert set(result["long"]) == {"context-extension", "annealing"}
    for rep in result["long"].values():
        assert [b["bucket"] for b in rep["bpb"]["code"]["buckets"]] == ["0-64", "64-128", "128-256"]
        assert set(rep["passkey"]) == {"256"}
    assert set(result["harness"]) == {"init", "annealing"}
    assert all(row["vinasmol_cloze_vi"]["n"] == 6 for row in result["harness"].values())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = _store(runs)
    export_dir = store.fetch(result["export"]["digest"])
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tok = AutoTokenizer.from_pretrained(export_dir)
    ids = tok("Hà Nội là thủ đô của Việt Nam.", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] >= len(tok) > 1024  # the extended vocabulary
    # the last run of the sequence (annealing forced from a start_ref) moved the export ref
    assert store.resolve("runs/tiny-test/export") == runs["restarted"]["export"]["digest"]


def test_prefect_artifacts_of_the_run(runs) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs["run_id"]]))
        )
    keys = {a.key for a in arts}
    types = {a.type for a in arts}
    assert {"progress", "table", "markdown"} <= types
    assert {f"progress-{s}" for s in STAGES} <= keys
    assert {f"metrics-{s}" for s in STAGES} <= keys
    assert {"loss-curve", "summary-tiny-test", "long-context", "harness"} <= keys
    latest: dict[str, Any] = {}
    for art in (a for a in arts if a.type == "progress"):
        if art.key not in latest or art.created > latest[art.key].created:
            latest[art.key] = art
    assert {k: float(a.data) for k, a in latest.items()} == {f"progress-{s}": 100.0 for s in STAGES}
    summary = next(a for a in arts if a.key == "summary-tiny-test")
    assert "Bits per byte" in summary.data and "fertility" in summary.data.lower()
    assert "| eeve-3 | sample-vi |" in summary.data  # the effective mixture of every stage
    assert "Long context: bits per byte by position" in summary.data and "vinasmol_cloze_vi" in summary.data
    long = next(a for a in arts if a.key == "long-context")
    assert "| annealing | code | 2 |" in long.data and "0-64 BPB" in long.data
    assert "| context-extension | 256 |" in long.data and long.data.count("data:image/svg+xml") == 2
    harness = next(a for a in arts if a.key == "harness")
    assert [row["stage"] for row in json.loads(harness.data)] == ["init", "annealing"]
    curve = next(a for a in arts if a.key == "loss-curve")
    assert "data:image/svg+xml;base64," in curve.data


def test_failure_then_retry_resumes_from_last_checkpoint(runs) -> None:
    first, retry = runs["first_attempt"], runs["retry_attempt"]
    assert first["train-stage-eeve-6"] is False
    assert "train-stage-eeve-7" not in first
    before = [
        "fetch-base-model",
        "train-tokenizer",
        "merge-vocabulary",
        "prepare-data-main",
        "prepare-data-annealing",
        "init-embeddings",
        "convert-to-litgpt",
        "train-stage-eeve-3",
        "train-stage-eeve-4",
        "evaluate-base",
        "evaluate-init",
        "evaluate-eeve-3",
        "evaluate-eeve-4",
    ]
    assert all(first.get(n) is True for n in before)
    assert not set(before) & set(retry), f"re-executed on retry: {set(before) & set(retry)}"
    assert retry["train-stage-eeve-6"] is True
    store = _store(runs)
    stage6 = store.get_manifest(runs["resumed"]["checkpoints"][2]["digest"])
    assert stage6.stage == "eeve-6"
    assert stage6.extra["resumed_from_step"] == FAIL_AT - 1
    # the same weights as an uninterrupted run of eeve-6 and everything after
    import torch

    reference = uninterrupted_reference(runs["recipe"], runs["store"], runs["resumed"])
    for i, digest in ((2, reference[0]), (len(STAGES) - 1, reference[-1])):
        a = _weights(store, runs["resumed"]["checkpoints"][i]["digest"])
        b = _weights(store, digest)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after {STAGES[i]}"


def test_start_ref_and_from_stage_rerun_only_that_stage(runs) -> None:
    """What the scheduled annealing deployment does: annealing from a named checkpoint; unchanged
    inputs hit the cache, and `force` trains it again (to the same weights)."""
    assert runs["weekly_steps"] == {}
    assert runs["restarted_steps"] == {
        "train-stage-annealing": True, "evaluate-annealing": True, "export": True
    }
    [annealed] = runs["restarted"]["checkpoints"]
    assert annealed["stage"] == "annealing"
    store = _store(runs)
    assert store.get_manifest(annealed["digest"]).parents[0] == store.resolve(
        "runs/tiny-test/context-extension"
    )
    import torch

    a = _weights(store, annealed["digest"])
    b = _weights(store, runs["changed"]["checkpoints"][-1]["digest"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unchanged_rerun_executes_nothing(runs) -> None:
    assert runs["again_steps"] == {}
    assert runs["again"]["export"]["digest"] == runs["resumed"]["export"]["digest"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        trs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs["again_id"]]))
        )
    assert trs and all(t.state.name == "Cached" for t in trs), [(t.name, t.state.name) for t in trs]


def test_new_annealing_data_reruns_only_annealing_eval_export(runs) -> None:
    assert runs["changed_steps"] == {
        "prepare-data-annealing": True,
        "train-stage-annealing": True,
        "evaluate-annealing": True,
        "export": True,
    }
    old, new = runs["again"]["checkpoints"], runs["changed"]["checkpoints"]
    assert [c["digest"] for c in old[:-1]] == [c["digest"] for c in new[:-1]]
    assert old[-1]["digest"] != new[-1]["digest"]


# ----------------------------------------------------------------------------- bad input
def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, _, err = run_vinasmol(monkeypatch, capsys, *args)
    return code, err


def test_bad_input_fails_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    from flows.pipeline import plan_run

    recipe = write_test_recipe(tmp_path / "ok.yaml")
    store_dir = tmp_path / "store"
    store = "file://" + str(store_dir)
    log = tmp_path / "timing.jsonl"
    monkeypatch.setenv("VINASMOL_TIMING_LOG", str(log))

    data = yaml.safe_load(recipe.read_text())
    data["stages"][1]["micro_batch"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"stages\.1\.micro_batch"):
        plan_run(bad, store)
    code, err = _cli(monkeypatch, capsys, "run", str(bad), "--store", store)
    assert code == 1 and "stages.1.micro_batch" in err

    with pytest.raises(ConfigError, match="unknown stage 'eeve-5'"):
        plan_run(recipe, store, from_stage="eeve-5")
    code, err = _cli(monkeypatch, capsys, "run", str(recipe), "--store", store, "--from-stage", "eeve-5")
    assert code == 1 and "unknown stage 'eeve-5'" in err and "eeve-6" in err
    code, err = _cli(monkeypatch, capsys, "run", str(recipe), "--store", store, "--force", "stage-9")
    assert code == 1 and "unknown stage 'stage-9'" in err

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unreachable = "file://" + str(blocker / "store")
    with pytest.raises(VinaSmolError, match="store"):
        plan_run(recipe, unreachable)
    code, err = _cli(monkeypatch, capsys, "run", str(recipe), "--store", unreachable)
    assert code == 1 and "error:" in err and "store" in err

    assert not log.exists(), "a step ran"
    assert not (store_dir / "manifests").exists() or not any((store_dir / "manifests").iterdir())


def test_force_and_start_ref_need_known_names(tmp_path: Path) -> None:
    from flows.pipeline import plan_run

    recipe = write_test_recipe(tmp_path / "ok.yaml")
    store = "file://" + str(tmp_path / "store")
    plan = plan_run(recipe, store, force=["eeve-7"])
    assert plan.forced == {"eeve-7", "context-extension", "annealing", "evaluate", "export"}
    assert plan.refresh_evaluation("eeve-7") and not plan.refresh_evaluation("eeve-3")
    assert not plan.refresh_evaluation("convert-to-litgpt")
    plan = plan_run(recipe, store, force=["evaluate"])
    assert plan.forced == {"evaluate", "export"} and plan.refresh_evaluation("fetch-base-model")
    with pytest.raises(ConfigError, match="start_ref needs from_stage"):
        plan_run(recipe, store, start_ref="runs/x/eeve-7")
    with pytest.raises(ConfigError, match="stage_runner"):
        plan_run(recipe, store, stage_runner="cluster")


# the names given to `@step`; a task run is named after its step
STEP_NAMES = {str(s) for s in Step}


def test_timing_log_is_json_lines(runs) -> None:
    """One line per executed step, in the order the flow ran them, with its real wall-clock time."""
    lines = runs["log"].read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows and len(rows) == len(lines)
    for r in rows:
        assert set(r) == {"step", "name", "started", "duration_s", "ok", "flow_run_id", "task_run_id"}, r
        assert r["step"] in STEP_NAMES, r
        assert r["name"] == r["step"] or r["name"].startswith(r["step"] + "-"), r
        assert isinstance(r["duration_s"], float | int) and not isinstance(r["duration_s"], bool), r
        assert r["duration_s"] >= 0 and isinstance(r["started"], float) and isinstance(r["ok"], bool), r
        assert r["flow_run_id"] in runs["flow_run_ids"] and r["task_run_id"], r
    # steps run one after another: each starts after the one before it ended
    for before, after in zip(rows, rows[1:], strict=False):
        assert before["started"] + before["duration_s"] <= after["started"] + 0.05, (before, after)
    assert all(r["duration_s"] > 0 for r in rows if r["step"] == Step.TRAIN_STAGE)
    assert [r["name"] for r in rows if not r["ok"]] == ["train-stage-eeve-6"]  # the injected failure only

    first_run = [r["name"] for r in read_timing_log(runs["log"], str(runs["run_id"]))]
    stages = [n for s in STAGES for n in (f"train-stage-{s}", f"evaluate-{s}")]
    assert first_run == [
        "fetch-base-model", "train-tokenizer", "merge-vocabulary", "prepare-data-annealing",
        "prepare-data-main", "init-embeddings", "convert-to-litgpt",
        "evaluate-base", "evaluate-init", *stages[:5],  # ... train-stage-eeve-6 fails, its retry:
        *stages[4:], "export",
    ]
    changed = [r["name"] for r in read_timing_log(runs["log"], runs["flow_run_ids"][2])]
    assert changed == ["prepare-data-annealing", "train-stage-annealing", "evaluate-annealing", "export"]


# ----------------------------------------------------------------------------- smoke run
def test_smoke_run_with_overrides_trains_two_steps_per_stage_in_its_own_namespace(
    prefect_server, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`run --smoke --set ...`: every step runs, each stage makes two optimizer steps, the store's
    `smoke/` namespace holds everything, and the summary projects the full recipe's hours."""
    from vinasmol_core.store import ArtifactStore

    recipe = write_test_recipe(tmp_path / "recipe.yaml")
    store_dir = tmp_path / "store"
    monkeypatch.setenv("VINASMOL_WORK_DIR", str(tmp_path / "work"))
    code, out, err = run_vinasmol(monkeypatch, capsys, "run", str(recipe), "--store", str(store_dir),
                                  "--smoke", "--set", "stages.eeve-4.lr=0.004")
    assert code == 0, err
    assert sorted(p.name for p in store_dir.iterdir()) == ["smoke"], "the smoke run wrote outside smoke/"
    smoke_store = ArtifactStore("file://" + str(store_dir / "smoke"))
    for name in STAGES:
        manifest = smoke_store.get_manifest(f"runs/tiny-test/{name}")
        assert manifest.step == 2 and manifest.metrics["steps"] == 2, name
        assert manifest.metrics["tokens_per_s"] > 0 and manifest.metrics["peak_host_mb"] > 0
        assert manifest.metrics["device"].startswith("cpu")
    assert smoke_store.get_manifest("runs/tiny-test/eeve-4").extra["spec"]["lr"] == 0.004

    steps = out.split("## Steps of this run")[1].split("##")[0]
    for name in ["fetch-base-model", "prepare-data-main", "export", *(f"train-stage-{s}" for s in STAGES)]:
        assert f"| {name} |" in steps, name
    projection = out.split("## Projection of the full run from this smoke run")[1]
    full = {s["name"]: s for s in yaml.safe_load(recipe.read_text())["stages"]}
    for name in STAGES:
        row = next(line for line in projection.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1].replace(",", "")) == full[name]["max_tokens"], row
        assert float(cells[-1].replace(",", "")) > 0, row
    assert "| all stages |" in projection
