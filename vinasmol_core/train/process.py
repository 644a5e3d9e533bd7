"""A stage as a process: `python -m vinasmol_core.train --job job.json`, or torchrun for several
devices; `run_stage_process` launches it and streams its metrics to a callback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import ConfigError, Preempted, StoreError, VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.train import watchdog
from vinasmol_core.train.metrics import ERROR_PREFIX, parse_line
from vinasmol_core.train.spec import StageJob, load_job

_ERRORS: dict[str, type[VinaSmolError]] = {
    "ConfigError": ConfigError,
    "StoreError": StoreError,
    "VinaSmolError": VinaSmolError,
}


STAGE_RUNNER_ENV = "VINASMOL_STAGE_RUNNER"
"""`process` (the default: a stage is a process of its own) or `in-process`: a one-device, one-node
stage runs the same `run_stage` in the caller's process and hands its metrics lines to the same
parser. For the test suite, where a stage process's imports cost 20 times its tiny training; no
SIGTERM handling, and a torch state shared with the caller."""


def stage_runner() -> str:
    value = os.environ.get(STAGE_RUNNER_ENV, "process")
    if value not in ("process", "in-process"):
        raise ConfigError(f"${STAGE_RUNNER_ENV}={value!r}: choose process or in-process")
    return value


def stage_command(job_path: Path, job: StageJob, metrics_path: Path | None = None) -> list[str]:
    """The command line that runs the stage: plain python for one device, torchrun for several."""
    spec = job.spec
    tail = ["-m", "vinasmol_core.train", "--job", str(job_path)]
    if metrics_path is not None:
        tail += ["--metrics", str(metrics_path)]
    if spec.nodes > 1:
        raise ConfigError(
            f"stage {spec.name}: nodes={spec.nodes}: one command runs one node; run_stage_process starts "
            "the group (local_group_commands), a JobSet runs it on Kubernetes"
        )
    if spec.devices > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={spec.devices}",
            *tail,
        ]
    return [sys.executable, *tail]


def stage_env(job: StageJob) -> dict[str, str]:
    """Environment of the stage process: unbuffered output; TorchDynamo off on CPU unless asked for."""
    from vinasmol_core.train.group import DIE_WITH_PARENT_ENV

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env[DIE_WITH_PARENT_ENV] = "1"
    on_cpu = job.spec.accelerator == "cpu" or (job.spec.accelerator == "auto" and not _cuda_visible())
    if on_cpu and job.spec.compile is not True:  # `auto` compiles on CUDA only
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
    if on_cpu and (job.spec.devices > 1 or job.spec.cpu_threads):
        threads = job.spec.cpu_threads or max(1, (os.cpu_count() or 1) // job.spec.devices)
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


class _Stream:
    """What one attempt printed: metrics go to the callback, the result and the first error are kept."""

    def __init__(self, on_metrics: Callable[[dict[str, Any]], None] | None, echo: bool) -> None:
        self.on_metrics, self.echo = on_metrics, echo
        self.tail: deque[str] = deque(maxlen=40)
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.timeouts: list[str] = []  # what each rank's step watchdog said

    def __call__(self, line: str) -> None:
        parsed = parse_line(line, self.on_metrics)
        if parsed is None:
            self.tail.append(line)
            if self.echo:
                print(line, flush=True)
        elif parsed[0] == "result":
            self.result = parsed[1]
        elif parsed[0] == "error":
            if parsed[1].get("type") == watchdog.ERROR_TYPE:
                self.timeouts.append(str(parsed[1].get("message", "")))
            if self.error is None:
                self.error = parsed[1]


def run_stage_process(
    job: StageJob,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    *,
    metrics_path: Path | None = None,
    echo: bool = True,
    timeout: float | None = None,
    restarts: int | None = None,
    on_launch: Callable[[list[int], list[list[str]]], None] | None = None,
) -> CheckpointManifest:
    """Run a stage in its own process, or with `nodes > 1` as a group of torchrun agents on this
    machine; call `on_metrics` for each metrics event as it arrives.

    A group that loses a node (an agent dies) starts again, at most `restarts` times (default
    group.DEFAULT_RESTARTS; `fail_at_step` applies to the first attempt only), and resumes from the
    newest partial checkpoint. Returns the published final checkpoint manifest; raises VinaSmolError
    (or the child's ConfigError/StoreError) when the stage fails, with the child's last output lines.
    `on_launch` gets the pids and command lines of the processes started for each attempt.
    """
    from vinasmol_core.store import ArtifactStore
    from vinasmol_core.train import group

    job.spec.check()
    if job.spec.nodes == 1 and job.spec.devices == 1 and stage_runner() == "in-process":
        return _run_in_this_process(job, _Stream(on_metrics, echo), metrics_path)
    bound = group.DEFAULT_RESTARTS if restarts is None else restarts
    attempts = 1 if job.spec.nodes == 1 else bound + 1
    with tempfile.TemporaryDirectory(prefix="vinasmol-job-") as tmp:
        job_path = Path(tmp) / "job.json"
        for attempt in range(attempts):
            this = job if attempt == 0 else job.model_copy(update={"fail_at_step": None})
            job_path.write_text(this.model_dump_json(indent=2), encoding="utf-8")
            env = stage_env(job)
            if job.spec.nodes == 1:
                cmds = [stage_command(job_path, job, metrics_path)]
            else:
                cmds = group.local_group_commands(job_path, job, bound, metrics_path)
                env = group.local_group_env(env)
            stream = _Stream(on_metrics, echo)
            rcs = group.run_processes(cmds, env, stream, timeout=timeout, on_launch=on_launch)
            if stream.result is not None and not any(rcs):
                break
            if stream.error is not None and stream.error.get("type") in ("ConfigError", "Preempted"):
                break  # a bad spec or input does not get better in a new attempt; SIGTERM means stop
            if attempt + 1 < attempts:
                last = "\n  ".join(list(stream.tail)[-8:])
                print(f"stage {job.spec.name}: group attempt {attempt + 1} failed (exit codes {rcs}); "
                      f"starting it again ({attempts - attempt - 1} left); its last output:\n  {last}",
                      flush=True)
    if stream.result is None or any(rcs):
        _raise_failure(job, stream, rcs, attempts)
    assert stream.result is not None
    manifest = ArtifactStore(job.store_url).get_manifest(stream.result["digest"])
    if not isinstance(manifest, CheckpointManifest):
        raise VinaSmolError(
            f"stage {job.spec.name} published {stream.result['digest']}, which is not a checkpoint"
        )
    return manifest


def _run_in_this_process(job: StageJob, stream: _Stream, metrics_path: Path | None) -> CheckpointManifest:
    from vinasmol_core.train.engine import run_stage

    manifest = run_stage(job, metrics_copy=metrics_path, announce=stream)
    assert manifest is not None  # one rank: rank 0
    return manifest


def _raise_failure(job: StageJob, stream: _Stream, rcs: list[int], attempts: int) -> None:
    if stream.timeouts:  # every rank whose watchdog ended it, the hung one among them
        raise VinaSmolError("\n".join(sorted(set(stream.timeouts))))
    error = stream.error
    if error is not None and error.get("type") == "Exception" and any(rc < 0 for rc in rcs):
        # A process killed by a signal (a lost node) is the cause; the survivors' broken collectives
        # (gloo "connection closed", NCCL timeouts) are its consequence, whichever was reported first.
        stream.tail.append(f"a surviving rank then failed: {error.get('message', '')}")
        error = None
    if error is not None and attempts > 1 and error.get("type") != "ConfigError":
        raise VinaSmolError(
            f"stage {job.spec.name} failed in each of {attempts} group attempts (a node lost each time?); "
            f"the last one: {error.get('message', '')}"
        )
    if error is not None:
        cls = _ERRORS.get(error.get("type", ""))
        if cls is None:
            raise VinaSmolError(f"stage {job.spec.name} failed: {error.get('message', '')}")
        raise cls(error.get("message", "stage failed"))
    rc = next((r for r in rcs if r), 0)
    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
    if attempts > 1:
        how = f"lost a node in each of {attempts} group attempts; the last one {how}"
    last = "\n".join(list(stream.tail)[-15:])
    raise VinaSmolError(f"stage {job.spec.name} {how}; last output:\n{last}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of one stage process (each torchrun rank runs it too)."""
    parser = argparse.ArgumentParser(prog="python -m vinasmol_core.train", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", type=Path, help="StageJob JSON")
    source.add_argument("--job-env", metavar="NAME", help="read the StageJob JSON from this variable")
    parser.add_argument("--metrics", type=Path, default=None, help="also append metrics JSONL here")
    args = parser.parse_args(argv)
    from vinasmol_core.train.group import die_with_parent

    die_with_parent()
    try:
        job = load_job(args.job) if args.job is not None else _job_from_env(args.job_env)
        from vinasmol_core.train.engine import catch_sigterm, run_stage

        catch_sigterm()
        run_stage(job, metrics_copy=args.metrics)
    except Preempted as exc:
        report_error("Preempted", str(exc))
        return 128 + signal.SIGTERM
    except VinaSmolError as exc:
        report_error(type(exc).__name__, str(exc))
        return 1
    except Exception as exc:
        traceback.print_exc()
        report_error("Exception", f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _job_from_env(name: str) -> StageJob:
    """The StageJob in environment variable `name` (a JobSet pod's), validated like a job file."""
    from pydantic import ValidationError

    text = os.environ.get(name)
    if not text:
        raise ConfigError(f"--job-env {name}: the environment variable is not set")
    try:
        job = StageJob.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid job in ${name}: {where}: {first['msg']}") from None
    job.spec.check()
    return job


def report_error(kind: str, message: str) -> None:
    """One machine-readable error line for the parent (and a readable one on stderr)."""
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"rank {rank}: "
    print(ERROR_PREFIX + json.dumps({"type": kind, "message": prefix + message}), flush=True)
    print(f"error: {prefix}{message}", file=sys.stderr, flush=True)
