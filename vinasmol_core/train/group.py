"""A multi-node stage on one machine: N torchrun agents on 127.0.0.1, one per node, as a group.

Each agent is `torchrun --nnodes N --nproc-per-node D --rdzv-backend c10d --rdzv-endpoint
127.0.0.1:PORT --max-restarts R`, in a session of its own. Agent 0 hosts the rendezvous store; the
ranks' gloo traffic stays on the loopback interface. This is the same code path as a JobSet on
Kubernetes (one pod per node, rendezvous on the headless service): torchrun restarts the workers of
live nodes itself, and a lost node (its agent gone) makes the whole group start again, as a JobSet's
failure policy does, from the stage's newest partial checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vinasmol_core.localserver.localhost import server_port
from vinasmol_core.train.spec import StageJob

DEFAULT_RESTARTS = 2  # group relaunches after a lost node, and torchrun restarts of live nodes' workers
_PR_SET_PDEATHSIG = 1


def agent_command(
    job_path: Path, job: StageJob, node: int, endpoint: str, run_id: str, max_restarts: int,
    metrics_path: Path | None = None,
) -> list[str]:
    """The torchrun agent of one node (`node` 0 hosts the c10d rendezvous store)."""
    spec = job.spec
    host = endpoint.rpartition(":")[0]
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.devices}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
        f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}",
        f"--local-addr={host}", f"--max-restarts={max_restarts}", "--monitor-interval=0.5",
        "-m", "vinasmol_core.train", "--job", str(job_path),
    ]
    if metrics_path is not None:
        cmd += ["--metrics", str(metrics_path)]
    return cmd


def local_group_commands(
    job_path: Path, job: StageJob, max_restarts: int, metrics_path: Path | None = None
) -> list[list[str]]:
    """One agent per node on 127.0.0.1, a fresh port and rendezvous id (one group attempt)."""
    endpoint = f"127.0.0.1:{server_port()}"
    run_id = f"{job.spec.name}-{uuid.uuid4().hex[:12]}"
    return [
        agent_command(job_path, job, node, endpoint, run_id, max_restarts, metrics_path)
        for node in range(job.spec.nodes)
    ]


def local_group_env(env: dict[str, str]) -> dict[str, str]:
    """gloo on the loopback interface: a local group's traffic never leaves the machine."""
    env = dict(env)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def run_processes(
    commands: list[list[str]],
    env: dict[str, str],
    on_line: Callable[[str], None],
    *,
    timeout: float | None = None,
    on_launch: Callable[[list[int], list[list[str]]], None] | None = None,
) -> list[int]:
    """Start the commands (each in its own session), pass every output line to `on_line`, and
    return their exit codes. The first one to fail takes the others down (SIGKILL to their
    sessions), as the loss of one node stops a gang; nothing started here outlives the call."""
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
            encoding="utf-8", errors="replace", bufsize=1, start_new_session=True,
        )
        for cmd in commands
    ]
    if on_launch is not None:
        on_launch([p.pid for p in procs], commands)
    forwarding, previous = _forward_sigterm(procs)
    lines: queue.Queue[str | None] = queue.Queue()
    readers = [threading.Thread(target=_pump, args=(p, lines), daemon=True) for p in procs]
    for reader in readers:
        reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    open_streams = len(procs)
    try:
        while open_streams:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                open_streams -= 1
            elif line:
                on_line(line)
            if any(p.poll() not in (None, 0) for p in procs):
                _kill_sessions(procs)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"stage processes still running after {timeout} s")
        return [p.wait() for p in procs]
    finally:
        if forwarding:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _kill_sessions(procs)
        for p in procs:
            p.wait()
        for reader in readers:
            reader.join(timeout=5)


def _forward_sigterm(procs: list[subprocess.Popen[str]]) -> tuple[bool, Any]:
    """In the main thread, a SIGTERM to this process (a pod being evicted) goes on to the commands'
    sessions: a stage stops after its step in progress, with a train-state of it, and its exit code
    comes back as usual. Returns whether it took SIGTERM over, and the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return False, None

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    return True, signal.signal(signal.SIGTERM, forward)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _kill_sessions(procs: list[subprocess.Popen[str]]) -> None:
    """SIGKILL every process of the commands' sessions (torchrun's workers die with their agent:
    `die_with_parent`)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


DIE_WITH_PARENT_ENV = "VINASMOL_DIE_WITH_PARENT"  # set by the process that starts a stage process


def die_with_parent() -> None:
    """Under a torchrun agent, or started by `run_stage_process` ($VINASMOL_DIE_WITH_PARENT): the
    kernel SIGKILLs this process when its parent dies (Linux), so a lost agent or a killed pipeline
    never leaves a stage training (or waiting) on its own. torchrun starts each worker in its own
    session, out of reach of a signal to the agent's process group; a stage process that prints
    nothing for a while (a long step, an upload) would otherwise only notice at its next line.

    The agent is whatever parent this worker has before prctl, whose pid may well be 1: in a
    Kubernetes pod the container's command, the agent, is PID 1 of the pod's PID namespace. A parent
    pid that changed across prctl is the agent having died in between (the worker was re-parented).
    """
    asked = "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get(DIE_WITH_PARENT_ENV) == "1"
    if not asked or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent:  # the agent died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def lose_node(nodes: int, step: int) -> None:
    """Fault injection (`fail_at_step`): one node, this process SIGKILLs itself; several nodes,
    the ranks of the last node SIGKILL their torchrun agent and themselves (a node lost)."""
    if nodes > 1:
        if int(os.environ.get("GROUP_RANK", "0")) != nodes - 1:
            return
        print(f"fail_at_step={step}: killing node {nodes - 1} (its torchrun agent and ranks)", flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
    else:
        print(f"fail_at_step={step}: killing this process", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
