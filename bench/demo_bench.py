"""Benchmark of `make demo`: the demo command twice, in subprocesses, on a fresh demo folder.

Measures the wall time of the first run, the time spent inside step functions (each executed step
appends its duration to a timing log), the difference (orchestration: Prefect server start, task and
flow bookkeeping, result storage, artifacts, process start-up and imports outside steps) and the wall
time of the second run, which must find every step cached.

Targets: demo <= 300 s, overhead <= 15 % of the wall, cached rerun <= 20 s.

    python bench/demo_bench.py [--data DIR] [--keep DIR]

`--data` is accepted for symmetry with the other benchmarks; the demo uses built-in corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(demo_dir: Path, log: Path) -> tuple[float, float, int, str]:
    """Wall seconds, launch time (epoch), exit status and output of one `vinasmol demo`."""
    env = dict(os.environ)
    env["VINASMOL_TIMING_LOG"] = str(log)
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-c", "from flows.cli import console; console()", "demo", "--dir", str(demo_dir)]
    launched = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, launched, proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="unused: the demo has built-in corpora")
    parser.add_argument("--keep", default=None, help="demo folder to use and keep (default: a temp folder)")
    args = parser.parse_args()

    demo_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vinasmol-demo-bench-"))
    if demo_dir.exists():
        shutil.rmtree(demo_dir)
    logs = [demo_dir.parent / f"{demo_dir.name}-timing-{i}.jsonl" for i in (1, 2)]
    for log in logs:
        log.unlink(missing_ok=True)

    wall1, launched1, rc1, out1 = run_demo(demo_dir, logs[0])
    if rc1 != 0:
        print(out1[-4000:])
        print(f"demo_bench: first run failed with status {rc1}")
        return 1
    wall2, _, rc2, out2 = run_demo(demo_dir, logs[1])
    if rc2 != 0:
        print(out2[-4000:])
        print(f"demo_bench: second run failed with status {rc2}")
        return 1

    rows = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
    rerun_rows = [json.loads(line) for line in logs[1].read_text().splitlines()] if logs[1].exists() else []
    per_step: dict[str, float] = defaultdict(float)
    for r in rows:
        per_step[r["name"]] += r["duration_s"]
    steps_s = sum(per_step.values())
    overhead = wall1 - steps_s
    overhead_pct = 100.0 * overhead / wall1

    print(f"{'step':<28}{'seconds':>10}")
    for name, secs in per_step.items():
        print(f"{name:<28}{secs:>10.2f}")
    print("-" * 38)
    print(f"{'steps total':<28}{steps_s:>10.2f}")
    print(f"{'first run wall':<28}{wall1:>10.2f}   (target <= 300)")
    first_start = min(r["started"] for r in rows)
    last_end = max(r["started"] + r["duration_s"] for r in rows)
    before, after = first_start - launched1, launched1 + wall1 - last_end
    print(f"{'  before the first step':<28}{before:>10.2f}   (start-up, Prefect server, flow run)")
    print(f"{'  between steps':<28}{overhead - before - after:>10.2f}")
    print(f"{'  after the last step':<28}{after:>10.2f}")
    print(
        f"{'orchestration overhead':<28}{overhead:>10.2f}"
        f"   ({overhead_pct:.1f} % of the wall, target <= 15 %)"
    )
    print(
        f"{'second run wall (cached)':<28}{wall2:>10.2f}   (target <= 20; steps executed: {len(rerun_rows)})"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    if not args.keep:
        shutil.rmtree(demo_dir, ignore_errors=True)
        for log in logs:
            log.unlink(missing_ok=True)
    print(
        f"demo_bench: wall_s={wall1:.1f} steps_s={steps_s:.1f} overhead_pct={overhead_pct:.1f} "
        f"cached_wall_s={wall2:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
