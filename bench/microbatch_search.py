"""The smoke run's micro-batch search on this device, against the planner's choice.

A one-step stage of a SmolLM2-360M-shaped model (random weights, the test tokenizer, the built-in
sample corpora) runs with `micro_batch_search` at `--seq-len`, up to `--max-micro-batch`: one forward
and backward pass per power of two, the largest whose peak memory leaves 10% of the device free
(`vinasmol_core.train.microbatch`). Beside it, `vinasmol plan`'s largest micro-batch for the same stage
on `--gpu`. On the CPU the search needs the device's memory given (`--memory-gib`, set as
$VINASMOL_DEVICE_MEMORY).

    python bench/microbatch_search.py --accelerator cuda --gpu h100-80gb        # on a GPU
    python bench/microbatch_search.py --shape tiny --seq-len 64 --memory-gib 0.05  # a check on the CPU

Ends with `microbatch_search: chosen=N planned=N tokens_per_s=X device=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = {"3": "new-embeddings", "4": "embeddings", "6": "all", "7": "transformer"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="unused (built-in sample corpora); for uniformity")
    parser.add_argument("--shape", choices=["tiny", "360m"], default="360m")
    parser.add_argument("--stage", choices=sorted(STAGES), default="6")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-micro-batch", type=int, default=64)
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on the CPU")
    parser.add_argument("--gpu", default="h100-80gb", help="the planner's GPU for the comparison")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="the device's memory (required on the CPU)")
    args = parser.parse_args()
    precision = args.precision or ("bf16-mixed" if args.accelerator == "cuda" else "32-true")
    if args.memory_gib is not None:
        os.environ["VINASMOL_DEVICE_MEMORY"] = str(int(args.memory_gib * 2**30))
    elif args.accelerator == "cpu":
        parser.error("--memory-gib: the CPU has no memory figure to search against")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    from vinasmol_core.builtin.fixtures import SMOLLM2_360M_SHAPE, build_tiny_inputs
    from vinasmol_core.train.engine import run_stage
    from vinasmol_core.train.metrics import METRICS_PREFIX
    from vinasmol_core.train.spec import StageJob, StageSpec

    work = Path(tempfile.mkdtemp(prefix="microbatch-search-"))
    try:
        url = (work / "store").as_uri()
        shape = dict(SMOLLM2_360M_SHAPE) if args.shape == "360m" else {"block_size": max(64, args.seq_len)}
        inputs = build_tiny_inputs(work / "inputs", url, **shape)
        spec = StageSpec(
            name=f"eeve-{args.stage}", trainable=STAGES[args.stage], lr=1e-4, min_lr=1e-5, warmup_steps=1,
            max_tokens=min(256, args.seq_len), seq_len=min(256, args.seq_len), global_batch=1, micro_batch=1,
            precision=precision,
            accelerator=args.accelerator, mixture={"vi": 0.6, "en": 0.3, "code": 0.1}, eval_sequences=0,
            eval_at_start=False, checkpoint_interval=1,
            micro_batch_search={"seq_len": args.seq_len, "max_micro_batch": args.max_micro_batch},
        )
        job = StageJob(spec=spec, init_checkpoint=inputs.init_ref, dataset=inputs.dataset_ref, store_url=url,
                       out_ref="bench/search", partial_ref_prefix="bench-partial/search")
        found: list[dict[str, Any]] = []

        def announce(line: str) -> None:
            if line.startswith(METRICS_PREFIX):
                event = json.loads(line[len(METRICS_PREFIX):])
                if event.get("event") == "micro_batch_search":
                    found.append(event)

        run_stage(job, announce=announce)
        planned = plan_choice(args, inputs, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    event = found[-1]
    capacity = event.get("capacity_bytes", 0) / 2**20
    print(f"| micro-batch | peak MiB | fits ({capacity:,.1f} MiB, 10% kept free) |")
    print("| ---: | ---: | --- |")
    for t in event.get("trials", []):
        peak = "out of memory" if t["peak_bytes"] is None else f"{t['peak_bytes'] / 2**20:,.1f}"
        print(f"| {t['micro_batch']} | {peak} | {'yes' if t['fits'] else 'no'} |")
    tps = event.get("tokens_per_s")
    print(f"microbatch_search: chosen={event.get('chosen')} planned={planned} "
          f"tokens_per_s={tps or 0:.0f} device={args.accelerator} seq_len={args.seq_len}"
          + (f" skipped={event['skipped']!r}" if event.get("skipped") else ""))
    return 0


def plan_choice(args: argparse.Namespace, inputs: Any, spec: Any) -> int | None:
    """The planner's largest micro-batch for the same model and stage on `--gpu` (or the given memory)."""
    from vinasmol_core.model.litgpt_io import load_litgpt_config
    from vinasmol_core.plan.gpu_plan import CUDA_RESERVE, GPU, GPUS, plan_stage, shape_of
    from vinasmol_core.store import ArtifactStore

    config = load_litgpt_config(Path(ArtifactStore(inputs.store_url).fetch(inputs.init_ref)))
    if args.memory_gib is None:
        gpu = GPUS[args.gpu]
    else:  # a given memory has no CUDA context in it: the plan's reserve is added back
        gpu = GPU("given", int(args.memory_gib * 2**30 + CUDA_RESERVE / 0.9), 1.0)
    full = spec.model_copy(update={"seq_len": args.seq_len, "global_batch": args.max_micro_batch,
                                   "micro_batch": 1})
    return plan_stage(full, config, inputs.base_vocab_size, shape_of(config), gpu, 1, 0.4).max_micro_batch


if __name__ == "__main__":
    raise SystemExit(main())
