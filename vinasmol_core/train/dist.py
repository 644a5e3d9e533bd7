"""Whole-model and optimizer state across strategies: plain / DDP (every rank holds everything) and
FSDP (sharded: gathered to full tensors on rank 0). Names are always the canonical parameter names
(`transformer.h.0.attn.qkv.weight`, ...), so a train-state saved under one strategy or world size
loads under another."""

from __future__ import annotations

from typing import Any

import torch

from vinasmol_core.train import params


def is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def _fsdp_root(model: Any) -> Any:
    """The FSDP root module inside Fabric's wrapper (and torch.compile's, if any)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module = getattr(model, "_forward_module", model)
    module = getattr(module, "_orig_mod", module)
    if not isinstance(module, FSDP):
        raise TypeError(f"expected an FSDP module, got {type(module).__name__}")
    return module


def full_module_state(fabric: Any, model: Any, raw_model: Any) -> dict[str, torch.Tensor]:
    """Canonical parameter tensors (the `module_state` layout). Collective under FSDP; the result is
    complete on rank 0 (other ranks may get an empty dict)."""
    if not is_fsdp(fabric):
        return params.module_state(raw_model)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = _fsdp_root(model)
    with FSDP.state_dict_type(
        root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    ):
        state = root.state_dict()
    if fabric.global_rank != 0:
        return {}
    names = set(params.named_parameters(raw_model))
    return {params.clean_name(k): v for k, v in state.items() if params.clean_name(k) in names}


def _canonical(fqn: str, known: set[str]) -> str:
    """The canonical name of an FSDP parameter name (`known`: the model's canonical names). FSDP names a
    shared parameter after its first use, `lm_head.weight` in litgpt's GPT; tied, it is the table."""
    name = params.clean_name(fqn)
    return params.EMBED if name == params.HEAD and name not in known else name


def _full_state_dicts(root: Any, rank0_only: bool) -> Any:
    """FSDP's context for full (unsharded, CPU-offloaded) model and optimizer state dicts."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        root,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
    )


def full_optimizer_state(
    fabric: Any, model: Any, optimizer: Any, names: dict[int, str]
) -> dict[str, torch.Tensor]:
    """AdamW state as `<param name>/<field>` tensors. Collective under FSDP (complete on rank 0)."""
    from vinasmol_core.train.state import optimizer_tensors

    if not is_fsdp(fabric):
        return optimizer_tensors(optimizer, names)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = _fsdp_root(model)
    with _full_state_dicts(root, rank0_only=True):
        osd = FSDP.optim_state_dict(root, optimizer)
    known = set(params.named_parameters(root))
    out: dict[str, torch.Tensor] = {}
    for fqn, fields in osd.get("state", {}).items():
        for key, value in fields.items():
            value = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float32)
            out[f"{_canonical(fqn, known)}/{key}"] = value
    return out


def load_full_optimizer_state(
    fabric: Any, model: Any, optimizer: Any, names: dict[int, str], tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of `full_optimizer_state` (every rank passes the full tensors)."""
    from vinasmol_core.train.state import load_optimizer_tensors

    if not is_fsdp(fabric):
        load_optimizer_tensors(optimizer, names, tensors)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = _fsdp_root(model)
    with _full_state_dicts(root, rank0_only=False):
        template = FSDP.optim_state_dict(root, optimizer)
        known = set(params.named_parameters(root))
        by_fqn: dict[str, str] = {}
        for group in template["param_groups"]:
            for fqn in group["params"]:
                by_fqn[_canonical(fqn, known)] = fqn
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, field = key.rpartition("/")
            state.setdefault(by_fqn[name], {})[field] = value
        osd = {"state": state, "param_groups": template["param_groups"]}
        flat = FSDP.optim_state_dict_to_load(root, optimizer, osd)
    optimizer.load_state_dict(flat)
