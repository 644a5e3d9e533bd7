"""Training throughput per trainable policy (EEVE stages 3, 4, 6, 7) next to `litgpt pretrain`.

Both sides train the same SmolLM2-shaped model (random weights, tied embeddings) on random tokens
at the same sequence length, micro batch and precision; litgpt pretrain runs in a subprocess
(TORCHDYNAMO_DISABLE=1 on the CPU) with its per-iteration times read from its log. Our side runs the
stage engine's optimizer step (`vinasmol_core.train.engine.optimizer_step`) under Fabric, with the
policy's exact freezing. litgpt pretrain has no freezing: it trains everything (compare with 6).
Rows 6r and 7r are stages 6 and 7 with ReLoRA (litgpt's LoRA adapters of rank --relora-rank on every
block linear layer; embeddings and norms at full rank in 6r), beside full-rank 6 and 7.

Every measurement runs in a fresh process of its own (ours through `--one STAGE`, litgpt through
`litgpt pretrain`), the runs alternate (ours, litgpt, ours, litgpt, ...) for `--repeats` rounds, and
each row keeps its best round: the two sides meet the same process state and the same noise.

`--loss full,chunked` measures each stage with both losses: `full` upcasts the whole micro-batch's
logits to fp32 (the loop's loss before `StageSpec.loss_chunk`), `chunked` runs the lm_head and the
cross-entropy over `--loss-chunk` positions at a time, recomputed in backward. The peak-memory column
is torch's peak allocation on CUDA and the process's peak RSS on the CPU; the first-step loss of the
two modes (same weights, same batch) must agree.

Model FLOPs per token = 6 N + 12 n_layer n_embd seq_len (N: parameters, the tied table once), the
PaLM convention; MFU = tokens/s x FLOPs per token / --peak-tflops.

    python bench/train_throughput.py --shape tiny --seq-len 256            # CPU smoke run
    python bench/train_throughput.py --shape 360m --seq-len 256 --stages 6,7,6r,7r --no-litgpt
    python bench/train_throughput.py --shape 360m --seq-len 2048 --precision bf16-mixed \
        --peak-tflops 989 --compile                                        # one CUDA GPU
    python bench/train_throughput.py --shape 360m --seq-len 2048 --micro-batch 4 --stages 6 \
        --loss full,chunked --steps 1 --warmup 0 --repeats 1 --no-litgpt --activation-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULT = "@@bench-result "
POLICIES = {
    "3": "new-embeddings", "4": "embeddings", "6": "all", "7": "transformer", "6r": "all", "7r": "transformer"
}  # 6r, 7r: stages 6 and 7 with ReLoRA


def stage_label(stage: str) -> str:
    return f"vinasmol stage {stage[:-1]} + ReLoRA" if stage.endswith("r") else f"vinasmol stage {stage}"


class _RandomRows(Dataset):
    def __init__(self, vocab_size: int, seq_len: int, n: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.n, self.seed = vocab_size, seq_len, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)


class RandomTokens(DataModule):
    """A litgpt DataModule of random token rows (`--data train_throughput.RandomTokens`)."""

    def __init__(self, vocab_size: int = 49152, num_rows: int = 4096, seed: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.num_rows, self.seed = vocab_size, num_rows, seed
        self.batch_size, self.seq_length = 1, 2048

    def connect(
        self, tokenizer: Any = None, batch_size: int = 1, max_seq_length: int | None = None, **_: Any
    ) -> None:
        self.batch_size = batch_size
        self.seq_length = max_seq_length or self.seq_length

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            _RandomRows(self.vocab_size, self.seq_length, self.num_rows, self.seed), self.batch_size
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_RandomRows(self.vocab_size, self.seq_length, 8, self.seed + 1), self.batch_size)


def model_flops_per_token(config: Any, n_params: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * config.n_layer * config.n_embd * seq_len


def measure_ours(config: Any, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s of the stage engine's optimizer step for one policy (after warm-up steps)."""
    from lightning.fabric import Fabric
    from litgpt.model import GPT

    from vinasmol_core.train import params, relora
    from vinasmol_core.train.engine import optimizer_step
    from vinasmol_core.train.runtime import enable_activation_checkpointing, make_optimizer
    from vinasmol_core.train.spec import ReLoRASpec, StageSpec

    spec = StageSpec(
        name="bench",
        trainable=policy,
        lr=1e-4,
        max_tokens=10**12,
        seq_len=args.seq_len,
        global_batch=args.micro_batch,
        micro_batch=args.micro_batch,
        precision=args.precision,
        mixture={"vi": 1.0},
        fused_adamw=args.fused_adamw,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
    )
    fabric = Fabric(accelerator=args.accelerator, devices=1, precision=args.precision)
    fabric.seed_everything(0)
    with fabric.init_module(empty_init=False):
        model = GPT(config)
    model.apply(model._init_weights)
    params.tie_embeddings(model)
    model.max_seq_length = args.seq_len
    base = args.base_vocab_size if args.base_vocab_size < config.vocab_size else config.vocab_size * 7 // 8
    params.apply_policy(model, policy, base_vocab_size=base)
    if args.relora:
        relora.attach(model, ReLoRASpec(rank=args.relora_rank), seed=0)
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    raw = model
    live = [p for p in params.named_parameters(raw).values() if p.requires_grad]
    n_trainable = sum(p.numel() for p in live)
    if args.compile:
        model = torch.compile(model)
    model = fabric.setup_module(model)
    optimizer, _ = make_optimizer(raw, spec)
    optimizer = fabric.setup_optimizers(optimizer)
    g = torch.Generator().manual_seed(0)
    times: list[float] = []
    cpu_times: list[float] = []  # this process's CPU seconds: less sensitive to a shared machine
    losses: list[float] = []
    for i in range(args.warmup + args.steps):
        batch = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = optimizer_step(
            fabric, model, optimizer, iter([batch]), 1, config.vocab_size, 1.0, raw=raw,
            loss_chunk=args.loss_chunk if args.loss_mode == "chunked" else 0,
        )
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    tokens = args.micro_batch * args.seq_len
    mem = torch.cuda.max_memory_allocated() / 2**30 if fabric.device.type == "cuda" else None
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {
        "tok_s": tokens * len(times) / sum(times), "trainable": n_trainable, "mem_gib": mem,
        "tok_cpu_s": tokens * len(cpu_times) / sum(cpu_times),
        "optimizer_mib": relora.optimizer_bytes(live) / 2**20, "first_loss": losses[0],
    }


def measure_litgpt(config: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run `litgpt pretrain` on the same config and random data; tokens/s from its iteration times."""
    from dataclasses import asdict

    import yaml

    iters = args.warmup + args.steps
    cfg = {
        "model_name": "bench",
        "model_config": asdict(config),
        "out_dir": str(work / "litgpt-out"),
        "precision": args.precision,
        "devices": 1,
        "num_nodes": 1,
        "logger_name": "csv",
        "seed": 0,
        "data": {
            "class_path": "train_throughput.RandomTokens",
            "init_args": {"vocab_size": config.vocab_size, "num_rows": iters * args.micro_batch + 8},
        },
        "train": {
            "save_interval": 10**9,
            "log_interval": 1,
            "global_batch_size": args.micro_batch,
            "micro_batch_size": args.micro_batch,
            "max_tokens": iters * args.micro_batch * args.seq_len,
            "max_seq_length": args.seq_len,
            "max_norm": 1.0,
            "min_lr": 1e-5,
            "lr_warmup_steps": 0,
            "tie_embeddings": True,
        },
        "eval": {"interval": 10**9, "max_iters": 1, "initial_validation": False, "final_validation": False},
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        },
    }
    cfg_path = work / "litgpt-pretrain.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent), str(REPO), env.get("PYTHONPATH", "")]
    )
    if args.accelerator == "cpu" or not torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
        if not args.compile:
            env["TORCHDYNAMO_DISABLE"] = "1"
    litgpt = Path(sys.executable).with_name("litgpt")
    cmd = [str(litgpt) if litgpt.exists() else "litgpt", "pretrain", "--config", str(cfg_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.litgpt_timeout)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-15:])
        return {"tok_s": None, "error": f"litgpt pretrain exited {proc.returncode}:\n{tail}"}
    iter_ms = [float(m) for m in re.findall(r"iter time: ([0-9.]+) ms", out)]
    measured = iter_ms[args.warmup :]
    if not measured:
        return {"tok_s": None, "error": "no iteration times in litgpt's output"}
    tokens = args.micro_batch * args.seq_len
    return {
        "tok_s": tokens * len(measured) / (sum(measured) / 1000.0),
        "wall_s": wall,
        "median_ms": statistics.median(measured),
    }


def measure_ours_isolated(stage: str, argv: list[str], loss_mode: str) -> dict[str, Any]:
    """`measure_ours` for one stage in a fresh process (the same conditions litgpt pretrain gets)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", stage, "--loss-mode", loss_mode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    return {"tok_s": None, "error": f"stage {stage} exited {proc.returncode}:\n{tail}"}


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r.get("tok_s")]
    return max(ok, key=lambda r: r["tok_s"]) if ok else results[-1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="../shared/data", help="unused (random tokens); kept for uniformity"
    )
    parser.add_argument("--shape", choices=["tiny", "360m"], default="360m")
    parser.add_argument("--vocab-size", type=int, default=55936, help="extended vocabulary (49152 + 6784)")
    parser.add_argument(
        "--base-vocab-size", type=int, default=49152, help="rows of the base vocabulary (stage 3)"
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per policy")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--stages", default="3,4,6,7,6r,7r", help="6r, 7r: stages 6 and 7 with ReLoRA")
    parser.add_argument("--relora-rank", type=int, default=128, help="ReLoRA rank of the 6r and 7r rows")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; each row keeps its best")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on the CPU")
    parser.add_argument("--accelerator", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16)"
    )
    parser.add_argument("--no-litgpt", action="store_true", help="skip the litgpt pretrain run")
    parser.add_argument("--litgpt-timeout", type=float, default=1800)
    parser.add_argument(
        "--loss", default="chunked", help="loss modes to measure: full, chunked or full,chunked"
    )
    parser.add_argument("--loss-chunk", type=int, default=256, help="positions per chunk of the chunked loss")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one stage
    parser.add_argument("--loss-mode", default="chunked", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    args.relora = bool(args.one and args.one.endswith("r"))
    args.accelerator = args.accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "cuda" else "32-true")
    return args


def bench_config(args: argparse.Namespace) -> Any:
    from vinasmol_core.builtin.fixtures import SMOLLM2_360M_SHAPE, TINY_SHAPE, smollm2_config

    shape = dict(SMOLLM2_360M_SHAPE if args.shape == "360m" else TINY_SHAPE)
    shape["block_size"] = max(shape["block_size"], args.seq_len)
    return smollm2_config(args.vocab_size, **shape)


def print_table(
    rows: list[tuple[str, str, dict[str, Any], str]], flops_tok: float, args: argparse.Namespace
) -> dict[str, str]:
    print()
    print(
        "| run | trainable | trainable params | AdamW state MiB | tokens/s | tokens/CPU-s | model TFLOP/s | "
        f"MFU (peak {args.peak_tflops} TFLOP/s) | peak memory GiB | loss | first loss |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    summary: dict[str, str] = {}
    for name, policy, res, key in rows:
        tok_s = res.get("tok_s")
        tflops = tok_s * flops_tok / 1e12 if tok_s else None
        mfu = tflops / args.peak_tflops if tflops and args.peak_tflops else None
        trainable = f"{res['trainable']:,}" if "trainable" in res else "all"
        peak = res.get("mem_gib") or res.get("rss_gib")
        rss = f"{peak:.2f}" if peak else "-"
        loss_mode = res.get("loss_mode", "full")
        first = f"{res['first_loss']:.6f}" if "first_loss" in res else "-"
        opt = f"{res['optimizer_mib']:.1f}" if "optimizer_mib" in res else "-"
        cpu = f"{res['tok_cpu_s']:.1f}" if res.get("tok_cpu_s") else "-"
        print(
            f"| {name} | {policy} | {trainable} | {opt} | {tok_s:.1f} | {cpu} | {tflops:.4f} | "
            f"{f'{100 * mfu:.2f}%' if mfu is not None else 'n/a'} | {rss} | {loss_mode} | {first} |"
            if tok_s
            else f"| {name} | {policy} | {trainable} | {opt} | failed | - | - | - | - | {loss_mode} | - |"
        )
        if peak:
            summary[f"{key}_peak_gib"] = f"{peak:.2f}"
        summary[f"{key}_tok_s"] = f"{tok_s:.1f}" if tok_s else "nan"
        if mfu is not None:
            summary[f"{key}_mfu"] = f"{mfu:.4f}"
    return summary


def ratios(summary: dict[str, str]) -> dict[str, str]:
    def value(key: str) -> float:
        return float(summary.get(key, "nan"))

    out = {}
    if "s6_tok_s" in summary and "litgpt_tok_s" in summary:
        out["s6_vs_litgpt"] = f"{value('s6_tok_s') / value('litgpt_tok_s'):.3f}"
    if "s3_tok_s" in summary and "s6_tok_s" in summary:
        out["s3_vs_s6"] = f"{value('s3_tok_s') / value('s6_tok_s'):.3f}"
    for stage in ("6", "7"):
        if f"s{stage}r_tok_s" in summary and f"s{stage}_tok_s" in summary:
            out[f"s{stage}r_vs_s{stage}"] = f"{value(f's{stage}r_tok_s') / value(f's{stage}_tok_s'):.3f}"
    return out


def main() -> None:
    args = parse_args()
    if args.accelerator == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "0" if args.compile else "1")
    config = bench_config(args)
    if args.one is not None:
        res = measure_ours(config, POLICIES[args.one], args)
        res["loss_mode"] = args.loss_mode
        res["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(RESULT + json.dumps(res), flush=True)
        return
    from litgpt.model import GPT

    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(config).parameters()) - config.padded_vocab_size * config.n_embd
    flops_tok = model_flops_per_token(config, n_params, args.seq_len)
    print(
        f"shape {args.shape}: {config.n_layer} layers x {config.n_embd}, vocab {config.vocab_size}, "
        f"{n_params / 1e6:.1f}M parameters (tied), seq_len {args.seq_len}, micro batch {args.micro_batch}, "
        f"{args.precision} on {args.accelerator} ({torch.get_num_threads()} threads), {args.steps} measured "
        f"steps after {args.warmup}, best of {args.repeats} alternating rounds; "
        f"model FLOPs/token {flops_tok / 1e9:.3f} G",
        flush=True,
    )
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    modes = [m.strip() for m in args.loss.split(",") if m.strip()]
    runs = [(s, m) for s in stages for m in modes]
    argv = sys.argv[1:]
    results: dict[Any, list[dict[str, Any]]] = {r: [] for r in [*runs, "litgpt"]}
    for round_ in range(args.repeats):
        for stage, mode in runs:
            res = measure_ours_isolated(stage, argv, mode)
            results[(stage, mode)].append(res)
            got = res.get("tok_s") or res.get("error")
            print(f"  round {round_ + 1}: {stage_label(stage)} ({POLICIES[stage]}, {mode} loss): {got}",
                  flush=True)
        if not args.no_litgpt:
            with tempfile.TemporaryDirectory(prefix="bench-litgpt-") as tmp:
                res = measure_litgpt(config, args, Path(tmp))
            results["litgpt"].append(res)
            got = res.get("tok_s") or res.get("error")
            print(f"  round {round_ + 1}: litgpt pretrain: {got}", flush=True)
    rows = [
        (stage_label(s), POLICIES[s], best(results[(s, m)]), f"s{s}" if m == modes[-1] else f"s{s}_{m}")
        for s, m in runs
    ]
    if results["litgpt"]:
        rows.append(("litgpt pretrain", "all (no freezing)", best(results["litgpt"]), "litgpt"))
    summary = print_table(rows, flops_tok, args)
    summary.update(ratios(summary))
    if {"full", "chunked"} <= set(modes):
        for s in stages:
            full, chunked = best(results[(s, "full")]), best(results[(s, "chunked")])
            if "first_loss" in full and "first_loss" in chunked:
                rel = abs(full["first_loss"] - chunked["first_loss"]) / abs(full["first_loss"])
                summary[f"s{s}_loss_rel_diff"] = f"{rel:.2e}"
            peak_full = full.get("mem_gib") or full.get("rss_gib")
            peak_chunked = chunked.get("mem_gib") or chunked.get("rss_gib")
            if peak_full and peak_chunked:
                summary[f"s{s}_peak_chunked_vs_full"] = f"{peak_chunked / peak_full:.3f}"
    print()
    print(
        "train_throughput: "
        + " ".join(
            [
                f"shape={args.shape}",
                f"seq_len={args.seq_len}",
                f"device={args.accelerator}",
                f"precision={args.precision}",
            ]
            + [f"{k}={v}" for k, v in summary.items()]
        )
    )


if __name__ == "__main__":
    main()
