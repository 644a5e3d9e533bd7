"""The training step's watching side against a real Prefect server: a stage run inline keeps the keyed
artifact `curves-<stage>` with a new version every `logging.artifact_interval` steps and at the end,
and a resumed stage's versions show the steps before the resume too."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

import pytest

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.train.spec import StageJob, StageLogging, StageSpec

pytestmark = pytest.mark.timeout(600)
NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vinasmol_core.builtin.fixtures import build_tiny_inputs

    root = tmp_path_factory.mktemp("tasks-train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VINASMOL_CACHE", str(root / "cache"))
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        yield build_tiny_inputs(root / "inputs", (root / "store").as_uri(), block_size=64)


def job_for(env, tag: str, name: str) -> StageJob:
    spec = StageSpec(
        name=name, trainable="all", lr=5e-3, min_lr=1e-4, warmup_steps=1, max_tokens=5 * 4 * 32,
        seq_len=32, global_batch=4, micro_batch=2, precision="32-true", accelerator="cpu",
        mixture={"vi": 0.6, "en": 0.4}, checkpoint_interval=2, eval_interval=2, eval_sequences=1,
        eval_at_start=False, cpu_threads=1,
    )
    return StageJob(
        spec=spec, init_checkpoint=env.init_ref, dataset=env.dataset_ref, store_url=env.store_url,
        out_ref=f"test/{tag}", partial_ref_prefix=f"test-partial/{tag}",
        logging=StageLogging(artifact_interval=2, tensorboard=False),
    )


def versions(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(arts, key=lambda a: a.created)


def train_points(markdown: str) -> list[float]:
    """Steps of the training-loss line of the first chart, read back from its SVG."""
    blob = re.search(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    svg = ET.fromstring(base64.b64decode(blob))
    [line] = [p for p in svg.iter(f"{NS}polyline") if p.get("data-label") == "train loss"]
    return [float(p.split(",")[0]) for p in line.get("points").split()]


def test_inline_stage_versions_its_curves_artifact(prefect_server, env) -> None:
    from prefect import flow

    from tasks.train import run_stage_job

    @flow(name="curves-inline", persist_result=False)
    def one_stage(job: StageJob) -> int:
        return len(run_stage_job(job)[1])

    one_stage(job_for(env, "inline", "curves-a"))
    arts = versions("curves-curves-a")
    # versions after steps 2 and 4 and the final one (5 steps)
    assert len(arts) == 3 and all(a.type == "markdown" for a in arts)
    assert ["(running)" in a.data for a in arts] == [True, True, False]
    assert [len(train_points(a.data)) for a in arts] == [2, 4, 5]
    last = arts[-1].data
    assert "| step | 5 / 5 |" in last and "| 4 |" in last  # the evaluation table


def test_a_resumed_stage_shows_the_steps_before_the_resume(prefect_server, env) -> None:
    from prefect import flow

    from tasks.train import run_stage_job

    @flow(name="curves-resume", persist_result=False)
    def one_stage(job: StageJob) -> int:
        return len(run_stage_job(job)[1])

    job = job_for(env, "resume", "curves-b")
    job.fail_at_step = 3
    with pytest.raises(VinaSmolError, match="killed"):
        one_stage(job)
    job.fail_at_step = None
    one_stage(job)
    arts = versions("curves-curves-b")
    # first process: the version at step 2 and the one at the failure (3 steps);
    # the resumed one: the version at step 4 (history 1..2 and steps 3, 4) and the final one
    assert [len(train_points(a.data)) for a in arts] == [2, 3, 4, 5]
    assert "(stopped)" in arts[1].data and "(finished)" in arts[-1].data
    assert "Resumed from the train-state of step 2." in arts[-1].data
