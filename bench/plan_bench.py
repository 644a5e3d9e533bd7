"""The planner against measurement: `vinasmol plan`'s peak memory per device against the peak resident
memory of real training steps on this CPU.

For the tiny, SmolLM2-135M and SmolLM2-360M shapes (random weights, the extended 55,936-token table
for the SmolLM2 shapes), EEVE stages 3 and 6, with and without activation checkpointing, and stage 6
with ReLoRA: a process of its own builds litgpt's GPT, applies the stage's trainable policy (and
ReLoRA, activation checkpointing) and AdamW with the stage's own code, sets it up in a one-device
Fabric (32-true) and runs two optimizer steps (`engine.optimizer_step`, the stage's chunked loss) on
random token ids. Measured: the peak resident set (VmHWM, reset through /proc/self/clear_refs once
the imports are done) minus the resident set at that moment. Planned: `plan_stage`'s parts for the
same stage, without the CUDA reserve. The error is (planned - measured) / measured.

    python bench/plan_bench.py [--seq-len 256] [--micro-batch 2] [--shapes tiny,135m,360m]

Ends with `plan_bench: rows=N max_err_pct=X`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULT = "@@plan-bench "
STAGES = {"3": "new-embeddings", "6": "all"}
VOCAB = 55_936
BASE_VOCAB = 49_152


def config_of(shape: str) -> Any:
    from dataclasses import replace

    from litgpt import Config

    if shape == "tiny":
        from vinasmol_core.builtin.fixtures import smollm2_config

        return smollm2_config(1536, block_size=4096)
    name = {"135m": "SmolLM2-135M", "360m": "SmolLM2-360M"}[shape]
    return replace(Config.from_name(name), vocab_size=VOCAB, padded_vocab_size=VOCAB)


def base_vocab_of(shape: str) -> int:
    return 1024 if shape == "tiny" else BASE_VOCAB


def spec_of(row: dict[str, Any]) -> Any:
    from vinasmol_core.train.spec import StageSpec

    extra: dict[str, Any] = {}
    if row["relora"]:
        extra["relora"] = {"rank": 32, "merge_every": 1000}
    return StageSpec(
        name=f"eeve-{row['stage']}", trainable=STAGES[row["stage"]], lr=1e-4, min_lr=1e-5, warmup_steps=1,
        max_tokens=10 * row["micro_batch"] * row["seq_len"], seq_len=row["seq_len"],
        global_batch=row["micro_batch"], micro_batch=row["micro_batch"], precision="32-true",
        accelerator="cpu", mixture={"vi": 1.0}, activation_checkpointing=row["ckpt"],
        base_vocab_size=base_vocab_of(row["shape"]), **extra,
    )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(row: dict[str, Any]) -> dict[str, Any]:
    """In this process: two optimizer steps of the row's stage; peak RSS above the baseline."""
    import torch
    from lightning.fabric import Fabric
    from litgpt.model import GPT

    from vinasmol_core.train import params, relora, runtime
    from vinasmol_core.train.engine import optimizer_step

    torch.set_num_threads(2)
    spec, config = spec_of(row), config_of(row["shape"])
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status_kib("VmRSS") * 1024
    torch.manual_seed(0)
    model = GPT(config)
    params.tie_embeddings(model)
    model.max_seq_length = spec.seq_len
    params.apply_policy(model, spec.trainable, spec.base_vocab_size)
    if spec.relora is not None:
        relora.attach(model, spec.relora, spec.seed)
    if spec.activation_checkpointing:
        runtime.enable_activation_checkpointing(model)
    module = fabric.setup_module(model)
    optimizer, _ = runtime.make_optimizer(model, spec)
    wrapped = fabric.setup_optimizers(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = torch.randint(config.vocab_size, (spec.micro_batch, spec.seq_len + 1), generator=generator)
        optimizer_step(fabric, module, wrapped, iter([batch]), 1, config.vocab_size, 1.0, raw=model,
                       loss_chunk=spec.loss_chunk)
    peak = _status_kib("VmHWM") * 1024
    return {"measured": peak - baseline}


def planned(row: dict[str, Any]) -> dict[str, Any]:
    from vinasmol_core.plan.gpu_plan import GPU, plan_stage, shape_of

    config = config_of(row["shape"])
    cpu = GPU("cpu", 1 << 50, 1.0)
    plan = plan_stage(spec_of(row), config, base_vocab_of(row["shape"]), shape_of(config), cpu, 1, 0.4)
    parts = plan.parts
    return {"planned": parts.total - parts.reserve, "weights": parts.weights, "gradients": parts.gradients,
            "optimizer": parts.optimizer, "activations": parts.activations, "logits": parts.logits}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="unused (random token ids); for uniformity")
    parser.add_argument("--shapes", default="tiny,135m,360m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: a row as JSON
    args = parser.parse_args()
    if args.one is not None:
        print(RESULT + json.dumps(measure(json.loads(args.one))), flush=True)
        return 0
    rows = []
    for shape in args.shapes.split(","):
        seq = args.seq_len * (8 if shape == "tiny" else 1)  # a tiny model's activations need more tokens
        variants = (("3", False, False), ("3", True, False), ("6", False, False), ("6", True, False),
                    ("6", False, True))
        for stage, ckpt, rl in variants:
            rows.append({"shape": shape, "stage": stage, "ckpt": ckpt, "relora": rl, "seq_len": seq,
                         "micro_batch": args.micro_batch})
    print("| shape | stage | act. ckpt | ReLoRA | tokens | planned MiB | measured MiB | error |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    errors = []
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TORCHDYNAMO_DISABLE": "1"}
    for row in rows:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(row)], capture_output=True,
                             text=True, env=env, cwd=REPO)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)), None)
        if line is None:
            print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {row} failed")
        got = json.loads(line[len(RESULT):])["measured"]
        plan = planned(row)["planned"]
        err = (plan - got) / got
        errors.append(abs(err))
        print(f"| {row['shape']} | {row['stage']} | {'yes' if row['ckpt'] else 'no'} | "
              f"{'yes' if row['relora'] else 'no'} | {row['micro_batch']} x {row['seq_len']} | "
              f"{plan / 2**20:,.1f} | {got / 2**20:,.1f} | {err:+.1%} |", flush=True)
    print(f"plan_bench: rows={len(rows)} max_err_pct={100 * max(errors):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
