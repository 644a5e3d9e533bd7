"""A stage as a process: `python -m vinasmol_core.train --job job.json`, or torchrun for several
devices; `run_stage_process` launches it and streams its metrics to a callback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vinasmol_core.errors import ConfigError, StoreError, VinaSmolError
from vinasmol_core.manifests import CheckpointManifest
from vinasmol_core.train.metrics import ERROR_PREFIX, parse_line
from vinasmol_core.train.spec import StageJob, load_job

_ERRORS: dict[str, type[VinaSmolError]] = {
    "ConfigError": ConfigError,
    "StoreError": StoreError,
    "VinaSmolError": VinaSmolError,
}


def stage_command(job_path: Path, job: StageJob, metrics_path: Path | None = None) -> list[str]:
    """The command line that runs the stage: plain python for one device, torchrun for several."""
    spec = job.spec
    tail = ["-m", "vinasmol_core.train", "--job", str(job_path)]
    if metrics_path is not None:
        tail += ["--metrics", str(metrics_path)]
    if spec.nodes > 1:
        raise ConfigError(
            f"stage {spec.name}: nodes={spec.nodes}: start `torchrun --nnodes {spec.nodes} --nproc-per-node "
            f"{spec.devices} ... -m vinasmol_core.train --job JOB` on every node "
            "(run_stage_process runs one node)"
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
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    on_cpu = job.spec.accelerator == "cpu" or (job.spec.accelerator == "auto" and not _cuda_visible())
    if on_cpu and not job.spec.compile:
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


def run_stage_process(
    job: StageJob,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    *,
    metrics_path: Path | None = None,
    echo: bool = True,
    timeout: float | None = None,
) -> CheckpointManifest:
    """Run a stage in its own process; call `on_metrics` for each metrics event as it arrives.

    Returns the published final checkpoint manifest; raises VinaSmolError (or the child's
    ConfigError/StoreError) when the stage fails, with the child's last output lines.
    """
    from vinasmol_core.store import ArtifactStore

    job.spec.check()
    with tempfile.TemporaryDirectory(prefix="vinasmol-job-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(job.model_dump_json(indent=2), encoding="utf-8")
        cmd = stage_command(job_path, job, metrics_path)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=stage_env(job),
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        tail: deque[str] = deque(maxlen=40)
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                parsed = parse_line(line, on_metrics)
                if parsed is None:
                    tail.append(line)
                    if echo:
                        print(line, flush=True)
                elif parsed[0] == "result":
                    result = parsed[1]
                elif parsed[0] == "error" and error is None:
                    error = parsed[1]
            rc = proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if error is not None:
        cls = _ERRORS.get(error.get("type", ""))
        if cls is None:
            raise VinaSmolError(f"stage {job.spec.name} failed: {error.get('message', '')}")
        raise cls(error.get("message", "stage failed"))
    if rc != 0 or result is None:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        last = "\n".join(list(tail)[-15:])
        raise VinaSmolError(f"stage {job.spec.name} {how}; last output:\n{last}")
    manifest = ArtifactStore(job.store_url).get_manifest(result["digest"])
    if not isinstance(manifest, CheckpointManifest):
        raise VinaSmolError(f"stage {job.spec.name} published {result['digest']}, which is not a checkpoint")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Entry point of one stage process (each torchrun rank runs it too)."""
    parser = argparse.ArgumentParser(prog="python -m vinasmol_core.train", description=__doc__)
    parser.add_argument("--job", type=Path, required=True, help="StageJob JSON")
    parser.add_argument("--metrics", type=Path, default=None, help="also append metrics JSONL here")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job)
        from vinasmol_core.train.engine import run_stage

        run_stage(job, metrics_copy=args.metrics)
    except VinaSmolError as exc:
        _report_error(type(exc).__name__, str(exc))
        return 1
    except Exception as exc:
        traceback.print_exc()
        _report_error("Exception", f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _report_error(kind: str, message: str) -> None:
    """One machine-readable error line for the parent (and a readable one on stderr)."""
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"rank {rank}: "
    print(ERROR_PREFIX + json.dumps({"type": kind, "message": prefix + message}), flush=True)
    print(f"error: {prefix}{message}", file=sys.stderr, flush=True)
