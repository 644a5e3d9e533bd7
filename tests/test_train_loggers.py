"""Fabric's CSV and TensorBoard loggers of a stage: one row per logged step, written live into the log
folder and copied into the final checkpoint, complete after a kill and resume; W&B refused clearly."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.train.spec import StageJob, StageLogging, StageSpec

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vinasmol_core.builtin.fixtures import build_tiny_inputs

    root = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VINASMOL_CACHE", str(root / "cache"))
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        mp.delenv("VINASMOL_LOG_DIR", raising=False)
        yield build_tiny_inputs(root / "inputs", (root / "store").as_uri(), block_size=64)


def job_for(env, tag: str, logging: StageLogging | None = None, **kw) -> StageJob:
    spec = StageSpec(
        name="eeve-6", trainable="all", lr=5e-3, min_lr=1e-4, warmup_steps=1, max_tokens=7 * 4 * 32,
        seq_len=32, global_batch=4, micro_batch=2, precision="32-true", accelerator="cpu",
        mixture={"vi": 0.6, "en": 0.4}, checkpoint_interval=2, eval_interval=3, eval_sequences=2,
        eval_at_start=False, cpu_threads=1, **kw,
    )
    return StageJob(
        spec=spec, init_checkpoint=env.init_ref, dataset=env.dataset_ref, store_url=env.store_url,
        out_ref=f"test/{tag}", partial_ref_prefix=f"test-partial/{tag}", logging=logging or StageLogging(),
    )


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def checkpoint_dir(env, digest: str) -> Path:
    from vinasmol_core.store import ArtifactStore

    return Path(ArtifactStore(env.store_url).fetch(digest))


def test_csv_has_one_row_per_logged_step_with_evaluations_in_the_same_row(env, tmp_path) -> None:
    from vinasmol_core.train.engine import run_stage

    live = tmp_path / "live"
    job = job_for(env, "csv", StageLogging(dir=str(live)), log_interval=2)
    manifest = run_stage(job)
    folder = checkpoint_dir(env, manifest.digest)
    rows = csv_rows(folder / "logs" / "csv" / "metrics.csv")
    # log_interval 2 over 7 steps: steps 2, 4, 6 and the last; evaluations at 3 and 6 (and 7)
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6, 7]
    by_step = {int(r["step"]): r for r in rows}
    assert by_step[6]["loss"] and by_step[6]["val_bpb/vi"] and by_step[6]["val_loss/en"]
    assert by_step[3]["loss"] == "" and by_step[3]["val_bpb/vi"]  # an evaluation between logged steps
    assert float(by_step[7]["tokens"]) == 7 * 4 * 32 and float(by_step[7]["lr"]) > 0
    assert list((folder / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # the live folder (<dir>/<stage>/<resume key>) holds the same CSV
    [live_csv] = live.glob("eeve-6/*/csv/metrics.csv")
    assert csv_rows(live_csv) == rows
    assert live_csv.parent.parent.name == job.resume_key(manifest.parents[0], manifest.parents[1])[:16]


def test_a_resumed_stage_logs_every_step_once(env) -> None:
    from vinasmol_core.train.process import run_stage_process

    job = job_for(env, "resumed")
    job.fail_at_step = 5
    with pytest.raises(VinaSmolError, match="killed"):
        run_stage_process(job, echo=False)
    job.fail_at_step = None
    seen: list[dict] = []
    manifest = run_stage_process(job, seen.append, echo=False)
    [history] = [e for e in seen if e["event"] == "history"]
    assert [e["step"] for e in history["events"] if e["event"] == "step"] == [1, 2, 3, 4]
    assert [e["step"] for e in seen if e["event"] == "step"] == [5, 6, 7]
    rows = csv_rows(checkpoint_dir(env, manifest.digest) / "logs" / "csv" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["loss"] for r in rows)


def test_loggers_can_be_switched_off(env) -> None:
    from vinasmol_core.train.engine import run_stage

    manifest = run_stage(job_for(env, "off", StageLogging(csv=False, tensorboard=False)))
    assert not any(path.startswith("logs/") for path in manifest.files)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_a_clear_error_before_training(env) -> None:
    from vinasmol_core.train.process import run_stage_process

    seen: list[dict] = []
    with pytest.raises(ConfigError, match=r"logging\.wandb is on but the wandb package is not installed"):
        run_stage_process(job_for(env, "wandb", StageLogging(wandb=True)), seen.append, echo=False)
    assert seen == []  # nothing trained


def test_the_wandb_key_is_no_setting() -> None:
    """The key comes from WANDB_API_KEY only: a recipe or job that carries one is refused."""
    from vinasmol_core.plan.recipe import parse_recipe

    with pytest.raises(Exception, match="wandb_api_key"):
        StageLogging.model_validate({"wandb": True, "wandb_api_key": "k"})
    with pytest.raises(ConfigError, match=r"logging\.wandb_api_key"):
        parse_recipe({"name": "r", "logging": {"wandb_api_key": "k"}}, "r.yaml")
