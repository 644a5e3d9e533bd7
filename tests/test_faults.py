"""Faults a user meets in the whole pipeline, fast versions of `bench/faults.py`'s rows (row 9, a
SIGTERM to a training stage, is `test_train_engine.py`'s; row 6's store repair is in
`test_store_artifacts.py`): `vinasmol run` SIGKILLed inside a training stage and started again, and
the S3 server killed during a publish and restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.test_flows_pipeline import write_test_recipe
from vinasmol_core.model.hf_io import sha256_file
from vinasmol_core.train.hold import StageHold

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parent.parent
TAG = "VINASMOL_TEST_RUN_TAG"


def _tagged(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (a run and everything it started)."""
    needle, found = f"{TAG}={tag}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if needle in environ and state != "Z":
                found.append(int(entry.name))
    return found


def _left_after(tag: str, wait: float = 15.0) -> list[str]:
    """The command lines of the processes of run `tag` still alive `wait` seconds after it ended."""
    deadline = time.monotonic() + wait
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in _tagged(tag):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        left.append(f"{pid}: " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return left


class _Pipeline:
    """`vinasmol run` of the small test recipe as a user's shell starts it: a process (and session)
    of its own, against the test's Prefect server."""

    def __init__(self, base: Path, store: str, extra_env: dict[str, str] | None = None) -> None:
        from prefect.settings import PREFECT_API_URL

        self.recipe = write_test_recipe(base / "recipe.yaml")
        self.store, self.log, self.out = store, base / "timing.jsonl", base / "run-output.txt"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(
            PREFECT_API_URL=str(PREFECT_API_URL.value()), VINASMOL_TIMING_LOG=str(self.log),
            VINASMOL_WORK_DIR=str(base / "work"), VINASMOL_CACHE=str(base / "cache"), TQDM_DISABLE="1",
            PREFECT_LOGGING_LEVEL="WARNING", **(extra_env or {}),
        )

    def start(self, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
        tag = uuid.uuid4().hex
        cmd = [sys.executable, "-c", "from flows.cli import console; console()", "run", str(self.recipe),
               "--store", self.store, "--stage-runner", "inline", *args]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "w", encoding="utf-8") as out:  # a file: a full pipe would stall the run
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {}), TAG: tag}, stdout=out,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return proc, tag

    def run(self, *args: str) -> tuple[int, str]:
        proc, tag = self.start(*args)
        proc.wait(timeout=600)
        assert _left_after(tag) == [], "processes of a finished run are still alive"
        return proc.returncode, self.out.read_text(encoding="utf-8")

    def executed(self) -> list[str]:
        from tasks.common import read_timing_log

        return [r["name"] for r in read_timing_log(self.log) if r["ok"]]


def _outputs(out: str) -> tuple[str, str]:
    lines = {ln.split(":", 1)[0]: ln for ln in out.splitlines() if ":" in ln}
    return tuple(lines[k].rsplit("(", 1)[1].rstrip(")") for k in ("final checkpoint", "HF export"))  # type: ignore[return-value]


def _content(store: str, outputs: tuple[str, str]) -> dict[str, str]:
    """sha256 of the final weights and of every export file (manifest digests carry times)."""
    from vinasmol_core.store import ArtifactStore

    st = ArtifactStore(store)
    ckpt, export = (Path(st.fetch(d)) for d in outputs)
    hashes = {"lit_model.pth": sha256_file(ckpt / "lit_model.pth")}
    hashes.update({f"export/{f.name}": sha256_file(f) for f in export.iterdir() if f.is_file()})
    return hashes


def test_run_killed_inside_a_stage_then_started_again(prefect_server, tmp_path: Path) -> None:
    """SIGKILL of `vinasmol run` once eeve-6 has a train-state: nothing it started stays alive; the
    same command again resumes eeve-6 from that train-state, recomputes no finished step, and ends
    with the weights and export of a run whose eeve-6 (and everything after) trained uninterrupted."""
    from vinasmol_core.store import ArtifactStore

    store = "file://" + str(tmp_path / "store")
    pipeline = _Pipeline(tmp_path, store)
    hold = StageHold(tmp_path, "eeve-6", 2)  # its first train-state: checkpoints every 2 steps
    # the killed run's stages are processes of their own (what the kill must not leave behind); the
    # runs after it train in-process, which gives the same bits
    proc, tag = pipeline.start(env={**hold.env, "VINASMOL_STAGE_RUNNER": "process"})
    assert hold.wait(proc), "the run ended before its stage held:\n" + pipeline.out.read_text()[-3000:]
    st = ArtifactStore(store)
    assert st.list_refs("partial/eeve-6/"), "eeve-6 holds after step 2 without a train-state"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _left_after(tag) == [], "the killed run left processes behind"
    finished_before = pipeline.executed()
    assert "train-stage-eeve-4" in finished_before and "train-stage-eeve-6" not in finished_before

    rc, out = pipeline.run()
    assert rc == 0, out[-3000:]
    executed = pipeline.executed()
    assert sorted({n for n in executed if executed.count(n) > 1}) == [], "a finished step ran again"
    assert st.get_manifest("runs/tiny-test/eeve-6").extra["resumed_from_step"] == 2
    resumed_content = _content(store, _outputs(out))

    before_forced = len(executed)
    rc, out = pipeline.run("--force", "eeve-6")
    assert rc == 0, out[-3000:]
    forced = pipeline.executed()[before_forced:]
    assert "train-stage-eeve-6" in forced and "train-stage-eeve-4" not in forced, forced
    assert st.get_manifest("runs/tiny-test/eeve-6").extra["resumed_from_step"] is None  # from step 0
    assert _content(store, _outputs(out)) == resumed_content


def test_s3_server_killed_during_a_publish_and_restarted(tmp_path: Path, monkeypatch) -> None:
    """SeaweedFS SIGKILLed in the middle of a 64 MB publish (held after its first blob is stored, its
    manifest not yet written), and the publish let go while the server is down; the server comes back
    on the same port and data. The publish fails with a StoreError or rides it out; publishing again
    succeeds, and `verify` finds every manifest's blobs (none names a missing one) with the content
    intact."""
    from vinasmol_core.common.errors import StoreError
    from vinasmol_core.common.manifests import DatasetManifest
    from vinasmol_core.localserver.seaweed import start_seaweed
    from vinasmol_core.store import ArtifactStore
    from vinasmol_core.store.backends import base

    src = tmp_path / "artifact"
    src.mkdir()
    for i in range(8):
        (src / f"part-{i}.bin").write_bytes(os.urandom(8 << 20))
    held, release = threading.Event(), threading.Event()
    blob_stored = base._Counters.up

    def hold_after_the_first_blob(counters: base._Counters, n: int) -> None:
        blob_stored(counters, n)
        if not held.is_set():
            held.set()
            release.wait()

    monkeypatch.setattr(base._Counters, "up", hold_after_the_first_blob)
    server = start_seaweed(tmp_path / "weed", buckets=("faults",))
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    restarted = []
    try:
        store = ArtifactStore(server.store_url("faults"), cache_dir=tmp_path / "cache")
        failure: list[BaseException] = []

        def publish() -> None:
            try:
                store.publish(DatasetManifest(name="big"), src, ref="runs/faults/big")
            except StoreError as exc:
                failure.append(exc)
            finally:
                held.set()  # a publish that never stored a blob must not leave the test waiting

        worker = threading.Thread(target=publish)
        worker.start()
        held.wait()
        assert worker.is_alive() and not failure, "the publish ended before its first blob was stored"
        assert not store.exists("runs/faults/big"), "the publish was not in flight"
        server.process.kill()
        server.process.wait()
        release.set()  # the rest of the publish meets a dead server
        restarted.append(start_seaweed(server.data_dir, s3_port=server.ports["s3.port"],
                                       access_key=server.access_key, secret_key=server.secret_key))
        worker.join(timeout=300)
        assert not worker.is_alive()
        if failure:
            assert "big" in str(failure[0]) or "store" in str(failure[0]).lower()
            assert not store.exists("runs/faults/big")
            store.publish(DatasetManifest(name="big"), src, ref="runs/faults/big")
        report = store.verify()
        assert report.ok, report.problems
        fetched = Path(store.fetch("runs/faults/big"))
        for f in src.iterdir():
            assert sha256_file(fetched / f.name) == sha256_file(f)
    finally:
        release.set()
        for srv in [server, *restarted]:
            srv.stop()


def test_a_killed_run_without_a_prefect_api_leaves_no_server_behind(tmp_path: Path) -> None:
    """`vinasmol run` with no Prefect API configured runs a Prefect server of its own; SIGKILLed
    mid-run (here once its first step has finished), the server goes with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "AWS_"))}
    tag, log = uuid.uuid4().hex, tmp_path / "timing.jsonl"
    env.update({TAG: tag, "PREFECT_HOME": str(tmp_path / "prefect"), "VINASMOL_TIMING_LOG": str(log),
                "VINASMOL_WORK_DIR": str(tmp_path / "work"), "VINASMOL_CACHE": str(tmp_path / "cache")})
    recipe = write_test_recipe(tmp_path / "recipe.yaml")
    cmd = [sys.executable, "-c", "from flows.cli import console; console()", "run", str(recipe),
           "--store", "file://" + str(tmp_path / "store"), "--stage-runner", "inline"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before its first step finished"
    servers = [p for p in _tagged(tag) if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes()
               or b"server" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert servers, "no Prefect server of the run's own"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _left_after(tag) == []
