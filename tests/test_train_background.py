"""Train-states written and uploaded in the background: the same bits as synchronous ones, and a stage
killed while an upload is in flight resumes from the newest complete train-state."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from tests.model_fixtures import tiny_stage_inputs
from tests.test_train_engine import events_of, make_job, stage_spec, step_losses, store_of, weights
from vinasmol_core.common.errors import VinaSmolError

pytestmark = pytest.mark.timeout(600)

STATE_FILES = ("model-frozen.safetensors", "model-trainable.safetensors", "optimizer.safetensors",
               "state.json")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_stage_inputs(tmp_path_factory, "background")


@pytest.fixture(scope="module")
def reference(env):
    """Stage 3 uninterrupted, in this process, with background train-states (the default)."""
    from vinasmol_core.train.engine import run_stage

    return run_stage(make_job(env, stage_spec("eeve-3", "new-embeddings"), "bg-reference"))


def _state_files(env, ref: str) -> dict[str, str]:
    """sha256 of each file of a train-state; of the RNG file, of its content (safetensors writes its
    metadata keys in no fixed order)."""
    from safetensors.torch import load

    from vinasmol_core.train.state import read_safetensors_metadata

    folder = Path(store_of(env).fetch(ref))
    out = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in STATE_FILES}
    rng = folder / "rng-rank0.safetensors"
    h = hashlib.sha256()
    for key, value in sorted(load(rng.read_bytes()).items()):
        h.update(key.encode() + value.numpy().tobytes())
    h.update(json.dumps(read_safetensors_metadata(rng), sort_keys=True).encode())
    out[rng.name] = h.hexdigest()
    return out


def test_background_and_synchronous_train_states_are_bit_identical(env, reference) -> None:
    from vinasmol_core.train.engine import run_stage

    sync = run_stage(
        make_job(env, stage_spec("eeve-3", "new-embeddings", async_checkpoints=False), "bg-sync")
    )
    assert sync.extra["resume_key"] == reference.extra["resume_key"]  # an operational field
    ref, got = weights(env, reference.digest), weights(env, sync.digest)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert step_losses(events_of(env, sync.digest)) == step_losses(events_of(env, reference.digest))
    for tag, manifest, background in (("bg-reference", reference, True), ("bg-sync", sync, False)):
        saved = [e for e in events_of(env, manifest.digest) if e["event"] == "checkpoint"]
        assert [e["step"] for e in saved] == [2, 4, 6], tag
        assert all(e["background"] is background and e["stall_s"] >= 0 for e in saved), tag
    for step in (2, 4, 6):
        a = _state_files(env, f"test-partial/bg-reference/eeve-3/step-{step:08d}")
        b = _state_files(env, f"test-partial/bg-sync/eeve-3/step-{step:08d}")
        assert a == b, step


def test_killed_during_a_background_upload_resumes_from_the_newest_complete_state(
    env, reference, stage_processes, tmp_path, monkeypatch
) -> None:
    """The upload of step 4's train-state is held (its files written, nothing of it in the store) while
    training goes on; the stage process is SIGKILLed there. The store holds step 2 only and verifies
    clean; a re-run resumes from step 2 and ends bit-identical to the uninterrupted run."""
    from vinasmol_core.train.hold import HOLD_UPLOAD_ENV
    from vinasmol_core.train.process import run_stage_process

    step_2 = "test-partial/bg-killed/eeve-3/step-00000002"
    fifo = tmp_path / "upload-hold"
    os.mkfifo(fifo)
    monkeypatch.setenv(HOLD_UPLOAD_ENV, f"eeve-3:4:{fifo}")
    job = make_job(env, stage_spec("eeve-3", "new-embeddings"), "bg-killed")
    pids: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_stage_process(job, echo=False, on_launch=lambda p, _c: pids.extend(p))
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            failure.append(exc)
        finally:  # wakes the reader below if the stage ended without holding
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            os.write(fd, b"exited\n")
            os.close(fd)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    with open(fifo, encoding="utf-8") as pipe:
        assert pipe.readline().strip() == "eeve-3 4", failure
    store = store_of(env)
    assert sorted(store.list_refs("test-partial/bg-killed/")) == [step_2]
    os.kill(pids[0], signal.SIGKILL)
    runner.join()
    assert len(failure) == 1 and isinstance(failure[0], VinaSmolError), failure
    assert "killed by signal 9" in str(failure[0])
    assert sorted(store.list_refs("test-partial/bg-killed/")) == [step_2]
    assert not store.exists("test/bg-killed/eeve-3")
    report = store.verify()
    assert report.ok, report.problems

    monkeypatch.delenv(HOLD_UPLOAD_ENV)
    monkeypatch.setenv("VINASMOL_STAGE_RUNNER", "in-process")
    seen: list[dict] = []
    manifest = run_stage_process(job, seen.append, echo=False)
    assert seen[0]["event"] == "start" and seen[0]["resumed_from"] == 2
    assert manifest.extra["resumed_from_step"] == 2
    ref, got = weights(env, reference.digest), weights(env, manifest.digest)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert step_losses(events_of(env, manifest.digest)) == step_losses(events_of(env, reference.digest))
    assert store.verify().ok
