"""How long the step loop stalls for a train-state: synchronous against background train-states.

A stage (EEVE stage 6 by default: every tensor trains, so a train-state holds the whole model and both
AdamW moments) of a SmolLM2-360M-shaped model (random weights; the small test tokenizer, so the
embedding table is small) trains on the sample corpora at `--seq-len`, with a train-state every
`--interval` steps, once with `async_checkpoints: false` and once with background train-states, to a
`file://` store and to a local SeaweedFS (127.0.0.1). Each run is a process of its own.

The stall of a train-state is the step loop's time in `Checkpointer.publish_state` (the checkpoint
event's `stall_s`): the whole write, hash and upload when synchronous; the wait for the previous
upload and the copy to host memory in the background. The summary averages the train-states taken
before the last step (the last one is always waited for: the stage ends there). A step's wall time is
the time between consecutive step events, so it includes the stall of the train-state before it and,
in the background, the upload's share of the CPU.

    python bench/checkpoint_bench.py                       # 360M shape, seq 256, file:// and SeaweedFS
    python bench/checkpoint_bench.py --shape tiny --stores file --steps 4     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULT = "@@bench-result "
STAGES = {"3": "new-embeddings", "4": "embeddings", "6": "all", "7": "transformer"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="unused (built-in sample corpora); for uniformity")
    parser.add_argument("--shape", choices=["tiny", "360m"], default="360m")
    parser.add_argument("--stage", choices=sorted(STAGES), default="6")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--interval", type=int, default=2, help="steps between train-states")
    parser.add_argument("--stores", default="file,s3", help="file, s3 (a local SeaweedFS) or both")
    parser.add_argument("--modes", default="sync,background")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--work", default=None, help="folder for stores and inputs (default: a temporary)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: MODE:STORE_URL
    parser.add_argument("--inputs", default=None, help=argparse.SUPPRESS)  # internal: inputs JSON
    return parser.parse_args(argv)


def build_inputs(args: argparse.Namespace, work: Path, file_url: str) -> dict[str, Any]:
    from vinasmol_core.builtin.fixtures import SMOLLM2_360M_SHAPE, build_tiny_inputs

    shape = dict(SMOLLM2_360M_SHAPE) if args.shape == "360m" else {"block_size": max(64, args.seq_len)}
    inputs = build_tiny_inputs(work / "inputs", file_url, **shape)
    return {"init": inputs.init_ref, "dataset": inputs.dataset_ref}


def copy_inputs(src_url: str, dst_url: str, refs: dict[str, str]) -> None:
    """Publish the init checkpoint and the dataset of one store into another, under the same refs."""
    from vinasmol_core.store import ArtifactStore

    src, dst = ArtifactStore(src_url), ArtifactStore(dst_url)
    for ref in refs.values():
        dst.publish(src.get_manifest(ref), Path(src.fetch(ref)), ref=ref)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One stage in this process; the arrival time of each event."""
    from vinasmol_core.train.engine import run_stage
    from vinasmol_core.train.metrics import METRICS_PREFIX
    from vinasmol_core.train.spec import StageJob, StageSpec

    mode, _, store_url = args.one.partition(":")
    refs = json.loads(args.inputs)
    spec = StageSpec(
        name=f"eeve-{args.stage}", trainable=STAGES[args.stage], lr=1e-4, min_lr=1e-5, warmup_steps=1,
        max_tokens=args.steps * args.global_batch * args.seq_len, seq_len=args.seq_len,
        global_batch=args.global_batch, micro_batch=args.micro_batch, precision=args.precision,
        accelerator=args.accelerator, mixture={"vi": 0.6, "en": 0.3, "code": 0.1},
        checkpoint_interval=args.interval, keep_checkpoints=1, eval_sequences=0, eval_at_start=False,
        async_checkpoints=mode == "background",
    )
    job = StageJob(
        spec=spec, init_checkpoint=refs["init"], dataset=refs["dataset"], store_url=store_url,
        out_ref=f"bench/{mode}/{spec.name}", partial_ref_prefix=f"bench-partial/{mode}/{spec.name}",
    )
    events: list[tuple[float, dict[str, Any]]] = []

    def announce(line: str) -> None:
        if line.startswith(METRICS_PREFIX):
            events.append((time.perf_counter(), json.loads(line[len(METRICS_PREFIX):])))

    t0 = time.perf_counter()
    run_stage(job, announce=announce)
    wall = time.perf_counter() - t0
    start = next(t for t, e in events if e["event"] == "start")
    steps = [(t, e) for t, e in events if e["event"] == "step"]
    step_wall, prev = [], start
    for t, _ in steps:
        step_wall.append(t - prev)
        prev = t
    last_step_t = steps[-1][0]
    final_ckpt_t = max(t for t, e in events if e["event"] == "checkpoint")
    return {
        "mode": mode,
        "step_wall_s": step_wall,
        "step_compute_s": [e["step_time_s"] for _, e in steps],
        "checkpoints": [
            {k: e[k] for k in ("step", "stall_s", "upload_s", "waited_s")}
            for _, e in events if e["event"] == "checkpoint"
        ],
        "train_wall_s": final_ckpt_t - start,
        "end_wait_s": max(0.0, final_ckpt_t - last_step_t),
        "wall_s": wall,
    }


def child_argv(args: argparse.Namespace) -> list[str]:
    """The options a measuring process needs."""
    return [
        "--shape", args.shape, "--stage", args.stage, "--seq-len", str(args.seq_len),
        "--micro-batch", str(args.micro_batch), "--global-batch", str(args.global_batch),
        "--steps", str(args.steps), "--interval", str(args.interval), "--accelerator", args.accelerator,
        "--precision", args.precision,
    ]


def measure(args: argparse.Namespace, mode: str, url: str, refs: dict[str, str],
            env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(args), "--one", f"{mode}:{url}",
           "--inputs", json.dumps(refs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
    raise SystemExit(f"checkpoint_bench: the {mode} run on {url} exited {proc.returncode}:\n{tail}")


def stall(result: dict[str, Any], steps: int) -> float:
    """Mean stall of the train-states taken before the last step."""
    ckpts = [c["stall_s"] for c in result["checkpoints"] if c["step"] < steps]
    return statistics.fmean(ckpts) if ckpts else float("nan")


def table(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    steps = range(1, args.steps + 1)
    lines = [
        "| store | train-states | " + " | ".join(f"step {i} s" for i in steps)
        + " | stall / train-state s | upload s | waited s | end wait s | steps + last state s |",
        "| --- | --- | " + " | ".join("---:" for _ in steps) + " | ---: | ---: | ---: | ---: | ---: |",
    ]
    for store, r in results:
        early = [c for c in r["checkpoints"] if c["step"] < args.steps]
        upload = statistics.fmean(c["upload_s"] for c in early) if early else float("nan")
        waited = sum(c["waited_s"] for c in early)
        lines.append(
            f"| {store} | {r['mode']} | " + " | ".join(f"{s:.2f}" for s in r["step_wall_s"])
            + f" | {stall(r, args.steps):.3f} | {upload:.2f} | {waited:.2f} | {r['end_wait_s']:.2f} | "
            f"{r['train_wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.one is not None:
        print(RESULT + json.dumps(run_one(args)), flush=True)
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="checkpoint-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    env = dict(os.environ)
    env["VINASMOL_CACHE"] = str(work / "cache")
    os.environ["VINASMOL_CACHE"] = env["VINASMOL_CACHE"]
    server = None
    results: list[tuple[str, dict[str, Any]]] = []
    try:
        file_url = (work / "inputs-store").as_uri()
        t0 = time.perf_counter()
        refs = build_inputs(args, work, file_url)
        print(f"inputs ({args.shape} shape) built in {time.perf_counter() - t0:.1f} s", flush=True)
        for store in stores:
            if store == "file":
                url = (work / "store").as_uri()
            else:
                from vinasmol_core.localserver.seaweed import start_seaweed

                server = start_seaweed(work / "seaweed", host="127.0.0.1", buckets=("bench",))
                env.update(server.env())
                os.environ.update(server.env())
                url = server.store_url("bench", "store")
            copy_inputs(file_url, url, refs)
            for mode in modes:
                res = measure(args, mode, url, refs, env)
                results.append((store, res))
                print(f"  {store} {mode}: stall {stall(res, args.steps):.3f} s per train-state, "
                      f"steps {[round(s, 2) for s in res['step_wall_s']]}", flush=True)
            if server is not None:
                server.stop()
                server = None
            elif store == "file":
                shutil.rmtree(work / "store", ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = table(results, args)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print()
    for store in stores:
        by_mode = {r["mode"]: r for s, r in results if s == store}
        if {"sync", "background"} <= by_mode.keys():
            sync_s, bg_s = stall(by_mode["sync"], args.steps), stall(by_mode["background"], args.steps)
            print(f"checkpoint_bench: sync_stall_s={sync_s:.3f} background_stall_s={bg_s:.3f} "
                  f"stall_ratio={bg_s / sync_s:.3f} store={store} shape={args.shape} stage={args.stage} "
                  f"seq_len={args.seq_len} interval={args.interval}")


if __name__ == "__main__":
    main()
