"""Whole-model and optimizer state across strategies: plain / DDP (every rank holds everything) and
FSDP (torch's FSDP2 `fully_shard` through Fabric's ModelParallelStrategy: every parameter and its
AdamW moments are DTensors sharded on dim 0, gathered to full tensors here). Names are always the
canonical parameter names (`transformer.h.0.attn.qkv.weight`, ...), so a train-state saved under one
strategy or world size loads under another. FSDP2 runs on the CPU with gloo as well as on CUDA."""

from __future__ import annotations

from typing import Any

import torch

from vinasmol_core.train import params


def is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def strategy_name(fabric: Any) -> str:
    """'fsdp', 'ddp' or 'single' (for the stage's start event)."""
    return "fsdp" if is_fsdp(fabric) else "ddp" if fabric.world_size > 1 else "single"


def shard_model(module: Any, mesh: Any) -> Any:
    """FSDP2 over the data-parallel mesh: each transformer block its own unit, the root holding the
    tied table (embedding and head in one unit, so the shared parameter stays one)."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if mesh.ndim > 1 else mesh
    for block in module.transformer.h:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(module, mesh=dp_mesh)
    return module


def full(tensor: Any) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_module_state(fabric: Any, model: Any, raw_model: Any) -> dict[str, torch.Tensor]:
    """Canonical parameter tensors (the `module_state` layout), whole on every rank. Collective
    under FSDP."""
    state = params.module_state(raw_model)
    if not is_fsdp(fabric):
        return state
    return {name: full(value).cpu() for name, value in state.items()}


def full_optimizer_state(
    fabric: Any, model: Any, optimizer: Any, names: dict[int, str]
) -> dict[str, torch.Tensor]:
    """AdamW state as `<param name>/<field>` tensors, whole on every rank. Collective under FSDP."""
    from vinasmol_core.train.state import optimizer_tensors

    tensors = optimizer_tensors(optimizer, names)
    if not is_fsdp(fabric):
        return tensors
    return {key: full(value).cpu() for key, value in tensors.items()}


def load_full_optimizer_state(
    fabric: Any, model: Any, optimizer: Any, names: dict[int, str], tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of `full_optimizer_state` (every rank passes the full tensors); under FSDP each rank
    keeps its shard of every moment, laid out like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from vinasmol_core.train.state import load_optimizer_tensors

    if is_fsdp(fabric):
        by_name = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}
        sharded: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            param = by_name.get(key.rpartition("/")[0])
            if isinstance(param, DTensor) and value.shape == param.shape:
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            sharded[key] = value
        tensors = sharded
    load_optimizer_tensors(optimizer, names, tensors)
