"""The stage's runtime: accelerator and determinism, the Fabric, the optimizer, rank ordering."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from vinasmol_core.train import params, relora
from vinasmol_core.train.spec import StageSpec

if TYPE_CHECKING:
    from lightning.fabric import Fabric


def configure_runtime(spec: StageSpec) -> str:
    """Accelerator choice, determinism switches. Returns 'cpu' or 'cuda'."""
    accelerator = spec.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    deterministic = spec.deterministic if spec.deterministic is not None else accelerator == "cpu"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=accelerator != "cpu")
        torch.backends.cudnn.benchmark = False
    if accelerator == "cpu" and spec.cpu_threads is not None:
        torch.set_num_threads(spec.cpu_threads)
    if accelerator == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def compile_enabled(spec: StageSpec, accelerator: str) -> bool:
    """Whether the stage runs torch.compile: `compile: auto` on CUDA only (a cold compile on the CPU
    costs tens of seconds, more than a short CPU stage gains)."""
    if spec.compile == "auto":
        return accelerator == "cuda"
    return bool(spec.compile)


FSDP_MIN_PARAMS = 3_000_000_000  # `strategy: auto` on several devices shards models from this size on


def resolve_strategy(spec: StageSpec, n_params: int | None = None) -> str:
    """'fsdp', 'ddp' or 'single'. `auto`: FSDP for a model of FSDP_MIN_PARAMS parameters or more on
    several devices (a 7B model's weights and fp32 AdamW moments, 16 bytes a parameter, outgrow one
    80 GB GPU; SmolLM2-360M's 6 GB do not), DDP below that. ConfigError for a stage the chosen strategy
    cannot run (ReLoRA under FSDP)."""
    if spec.strategy == "fsdp":
        chosen = "fsdp"
    elif spec.strategy == "ddp":
        chosen = "ddp"
    elif spec.world_size == 1:
        chosen = "single"
    else:
        chosen = "fsdp" if n_params is not None and n_params >= FSDP_MIN_PARAMS else "ddp"
    spec.check_strategy(chosen)  # ConfigError for what the chosen strategy cannot run
    return chosen


def count_params(model_config: dict[str, Any]) -> int | None:
    """Parameters of litgpt's GPT for a checkpoint's config (built on the meta device, tied); None
    when the manifest has no config (the strategy then falls back to DDP)."""
    from dataclasses import fields

    from litgpt import Config
    from litgpt.model import GPT

    known = {f.name for f in fields(Config) if f.init}
    if not model_config:
        return None
    with torch.device("meta"):
        model = GPT(Config(**{k: v for k, v in model_config.items() if k in known}))
    return sum(p.numel() for p in params.named_parameters(model).values()) - model.lm_head.weight.numel()


def make_fabric(spec: StageSpec, accelerator: str, n_params: int | None = None) -> Fabric:
    """The Fabric of a stage: plain, DDP (gloo on the CPU, NCCL on CUDA) or FSDP2 (both devices)."""
    from functools import partial

    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    from vinasmol_core.train.dist import shard_model

    strategy: Any = "auto"
    chosen = resolve_strategy(spec, n_params)
    if chosen == "fsdp":
        strategy = ModelParallelStrategy(
            parallelize_fn=partial(shard_model), data_parallel_size=spec.world_size, tensor_parallel_size=1
        )
    elif chosen == "ddp":
        strategy = DDPStrategy(process_group_backend="nccl" if accelerator == "cuda" else "gloo")
    return Fabric(
        accelerator=accelerator,
        devices=spec.devices,
        num_nodes=spec.nodes,
        strategy=strategy,
        precision=spec.precision,
    )


@contextlib.contextmanager
def local_rank_zero_first(fabric: Fabric) -> Iterator[None]:
    """Local rank 0 runs the block first (fills the store cache), then the others."""
    if fabric.local_rank != 0:
        fabric.barrier()
    yield
    if fabric.local_rank == 0:
        fabric.barrier()


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each transformer block in backward (non-reentrant checkpoint), names unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def make_optimizer(model: Any, spec: StageSpec) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """AdamW over the trainable tensors only; no weight decay on vectors (norms, biases). ReLoRA's
    adapters form a group of their own (`"relora": True`): only their learning rate restarts at a merge."""
    named = {n: p for n, p in params.named_parameters(model).items() if p.requires_grad}
    adapters = [p for n, p in sorted(named.items()) if relora.is_adapter(n)]
    decay = [p for n, p in sorted(named.items()) if p.ndim >= 2 and not relora.is_adapter(n)]
    no_decay = [p for n, p in sorted(named.items()) if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if adapters:
        groups.append({"params": adapters, "weight_decay": spec.weight_decay, "relora": True})
    # fused: one pass over parameter, gradient and both moments per tensor, on CUDA and on the CPU
    # (torch's CPU kernel), instead of some eight elementwise passes of the per-tensor loop
    fused = spec.fused_adamw if spec.fused_adamw is not None else True
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=fused or None)
    return optimizer, {id(p): n for n, p in named.items()}


def gather_bytes(fabric: Fabric, blob: bytes) -> list[bytes]:
    """All ranks' byte strings (only meaningful on rank 0)."""
    if fabric.world_size == 1:
        return [blob]
    device = fabric.device
    length = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    lengths = fabric.all_gather(length).reshape(-1).tolist()
    buf = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    gathered = fabric.all_gather(buf).reshape(len(lengths), -1).cpu()
    return [bytes(gathered[r, : lengths[r]].numpy().tobytes()) for r in range(len(lengths))]
