"""A multi-node stage on one machine: torchrun agents on 127.0.0.1 (c10d rendezvous, gloo), real
training of the tiny model. Two nodes of one process against one node of two, a node lost mid-stage
(its agent SIGKILLed) and the group's bounded restart, and that nothing started outlives the run."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.train import params
from vinasmol_core.train.group import run_processes
from vinasmol_core.train.metrics import read_events
from vinasmol_core.train.spec import StageJob, StageSpec

pytestmark = pytest.mark.timeout(600)

MIXTURE = {"vi": 0.6, "en": 0.3, "code": 0.1}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vinasmol_core.builtin.fixtures import build_tiny_inputs

    root = tmp_path_factory.mktemp("group")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VINASMOL_CACHE", str(root / "cache"))
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        yield build_tiny_inputs(root / "inputs", (root / "store").as_uri(), block_size=64)


def _job(env, tag: str, **kw) -> StageJob:
    spec = StageSpec(
        name="eeve-3", trainable="new-embeddings", lr=5e-3, min_lr=1e-4, warmup_steps=1,
        max_tokens=6 * 4 * 32, seq_len=32, global_batch=4, micro_batch=2, precision="32-true",
        accelerator="cpu", mixture=MIXTURE, checkpoint_interval=2, eval_interval=3, eval_sequences=2,
        cpu_threads=1, **kw,
    )
    return StageJob(
        spec=spec, init_checkpoint=env.init_ref, dataset=env.dataset_ref, store_url=env.store_url,
        out_ref=f"test/{tag}", partial_ref_prefix=f"test-partial/{tag}",
    )


def _fetch(env, digest: str) -> Path:
    from vinasmol_core.store import ArtifactStore

    return Path(ArtifactStore(env.store_url).fetch(digest))


def _weights(env, digest: str) -> dict[str, torch.Tensor]:
    return torch.load(_fetch(env, digest) / "lit_model.pth", weights_only=True)


def _left_behind(sids: set[int], run_ids: set[str] = frozenset()) -> list[str]:
    """Live processes of these sessions (each launched process leads one), or torchrun workers of
    these rendezvous ids (they run in sessions of their own and carry TORCHELASTIC_RUN_ID)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        run_id = next((v[20:].decode() for v in environ if v.startswith(b"TORCHELASTIC_RUN_ID=")), None)
        if fields[0] != "Z" and (int(entry.name) in sids or int(fields[3]) in sids or run_id in run_ids):
            alive.append(f"{entry.name}: {stat[:80]}")
    return alive


class _Launches:
    """on_launch: the pids of each attempt, and the rendezvous ids on the agents' command lines."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.run_ids: set[str] = set()
        self.attempts = 0

    def __call__(self, pids: list[int], commands: list[list[str]]) -> None:
        self.attempts += 1
        self.pids.update(pids)
        ids = (a.partition("=")[2] for cmd in commands for a in cmd if a.startswith("--rdzv-id="))
        self.run_ids.update(ids)

    def left_behind(self) -> list[str]:
        return _left_behind(self.pids, self.run_ids)


@pytest.fixture(scope="module")
def two_nodes(env):
    """The stage as two nodes of one process each, uninterrupted, timed."""
    from vinasmol_core.train.process import run_stage_process

    launches = _Launches()
    t0 = time.perf_counter()
    manifest = run_stage_process(_job(env, "two-nodes", nodes=2), echo=False, on_launch=launches)
    wall = time.perf_counter() - t0
    assert launches.attempts == 1 and len(launches.run_ids) == 1 and not launches.left_behind()
    return manifest, wall


def test_two_nodes_of_one_process_match_one_node_of_two(env, two_nodes) -> None:
    from vinasmol_core.train.process import run_stage_process

    nodes, wall_nodes = two_nodes
    t0 = time.perf_counter()
    single = run_stage_process(_job(env, "single"), echo=False)
    wall_single = time.perf_counter() - t0
    devices = run_stage_process(_job(env, "two-devices", devices=2), echo=False)
    print(f"\nwall time, 6 steps: 2 nodes x 1 process {wall_nodes:.1f} s, 1 process {wall_single:.1f} s")

    starts = [e for e in read_events(_fetch(env, nodes.digest) / "metrics.jsonl") if e["event"] == "start"]
    assert starts[0]["world_size"] == 2 and nodes.extra["spec"]["nodes"] == 2
    a, b = _weights(env, nodes.digest), _weights(env, devices.digest)
    assert sorted(a) == sorted(b)
    base = env.base_vocab_size
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
        if name not in (params.EMBED, params.HEAD):  # frozen under new-embeddings
            assert torch.equal(a[name], b[name]), name
    assert torch.equal(a[params.EMBED][:base], b[params.EMBED][:base])
    torch.testing.assert_close(a[params.EMBED], _weights(env, single.digest)[params.EMBED], rtol=0, atol=1e-5)


def test_a_lost_node_restarts_the_group_from_the_partial_checkpoint(env, two_nodes) -> None:
    """The last node's agent is SIGKILLed after step 5 (train-states at 2 and 4): the group starts
    again, resumes from step 4 and ends bit-identical to the uninterrupted run; past the bound the
    stage fails."""
    from vinasmol_core.store import ArtifactStore
    from vinasmol_core.train.process import run_stage_process

    job = _job(env, "lost-node", nodes=2)
    job.fail_at_step = 5
    launches = _Launches()
    with pytest.raises(VinaSmolError, match="eeve-3 was killed by signal 9"):
        run_stage_process(job, echo=False, restarts=0, on_launch=launches)
    assert launches.attempts == 1 and not launches.left_behind()
    store = ArtifactStore(env.store_url)
    assert sorted(store.list_refs("test-partial/lost-node/")) == [
        "test-partial/lost-node/step-00000002", "test-partial/lost-node/step-00000004",
    ]

    seen: list[dict] = []
    manifest = run_stage_process(job, seen.append, echo=False, restarts=1, on_launch=launches)
    assert launches.attempts == 3 and not launches.left_behind()
    starts = [e for e in seen if e["event"] == "start"]
    assert [s["resumed_from"] for s in starts] == [4, 4]  # each attempt from the newest train-state
    assert manifest.extra["resumed_from_step"] == 4
    ref, got = _weights(env, two_nodes[0].digest), _weights(env, manifest.digest)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_the_first_process_to_fail_takes_the_others_down(tmp_path) -> None:
    """A failing member stops the rest of the gang, children of their sessions included."""
    sleeper = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print('up', flush=True); time.sleep(120)"
    )
    failer = "import time; time.sleep(1.0); raise SystemExit(3)"
    launched: list[int] = []
    lines: list[str] = []

    def on_launch(pids: list[int], commands: list[list[str]]) -> None:
        launched.extend(pids)

    t0 = time.perf_counter()
    rcs = run_processes(
        [[sys.executable, "-c", sleeper], [sys.executable, "-c", failer]], dict(os.environ),
        lines.append, on_launch=on_launch,
    )
    assert time.perf_counter() - t0 < 30
    assert rcs == [-9, 3] and lines == ["up"]
    assert not _left_behind(set(launched))


# A torchrun worker: it calls die_with_parent first, then says so on the fd it is given; then it ends
# ("reap") or waits for a signal ("die", its agent is about to go).
_WORKER = (
    "import os, signal, sys\n"
    "from vinasmol_core.train.group import die_with_parent\n"
    "die_with_parent()\n"
    "os.write(int(sys.argv[1]), b'alive')\n"
    "if sys.argv[2] == 'die':\n"
    "    signal.pause()\n"
)
# Its agent: starts the worker, waits until it reports, then exits (the agent lost) or reaps it.
_AGENT = (
    "import os, subprocess, sys\n"
    "r, w = os.pipe()\n"
    "worker = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(w), sys.argv[2]], pass_fds=(w,))\n"
    "os.close(w)\n"
    "print(os.getpid(), os.read(r, 5).decode() or 'no word', flush=True)\n"
    "if sys.argv[2] == 'die':\n"
    "    os._exit(0)\n"
    "print(worker.wait(), flush=True)\n"
)


def _unshare_pid() -> list[str]:
    """The prefix that runs a command as PID 1 of a new PID namespace (as a pod's command is)."""
    import shutil
    import subprocess

    cmd = ["unshare", "--user", "--map-root-user", "--pid", "--fork"]
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` on this host")
    res = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        pytest.skip(f"unprivileged user and PID namespaces are not available here: {res.stderr.strip()}")
    return cmd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_worker_under_an_agent_that_is_pid_1_lives(tmp_path) -> None:
    """In a pod the torchrun agent is PID 1: its worker's parent pid is 1 from the start."""
    import subprocess

    env = {**os.environ, "TORCHELASTIC_RUN_ID": "pod", "PYTHONPATH": str(Path(__file__).parents[1])}
    res = subprocess.run(
        [*_unshare_pid(), sys.executable, "-c", _AGENT, _WORKER, "reap"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "alive", "0"], res.stdout + res.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_worker_dies_with_its_agent() -> None:
    """The agent gone (here it exits once its worker has armed the signal), the kernel kills the
    worker: the end of the worker's copy of the output pipe shows it."""
    import selectors
    import subprocess

    env = {**os.environ, "TORCHELASTIC_RUN_ID": "node", "PYTHONPATH": str(Path(__file__).parents[1])}
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT, _WORKER, "die"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert agent.wait(timeout=120) == 0
    assert agent.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(agent.stdout, selectors.EVENT_READ)
    out = ""
    while True:  # EOF once every holder of the pipe, the worker too, is gone
        assert sel.select(timeout=60), f"the worker outlived its agent: {out!r}"
        chunk = agent.stdout.readline()
        if not chunk:
            break
        out += chunk
    assert out.split()[1:] == ["alive"], out
