"""ReLoRA on litgpt's GPT: low-rank adapters merged into the base weights every few steps.

The adapters are litgpt's own `litgpt.lora.LoRALinear`, wrapped around the model's existing
`nn.Linear` layers (the base weight is not copied). `LoRALinear.merge` adds `(B @ A) * alpha / r`
into the base weight; the adapters then start again from litgpt's initialisation (A Kaiming-uniform,
B zero, so the model's function does not change at a merge), drawn from a generator seeded by the
stage seed and the merge cycle: the same on every rank and after a resume, whatever the global RNG.

Names: the wrapped base weight keeps its canonical name (`transformer.h.0.attn.qkv.weight`,
`params.clean_name` drops litgpt's `.linear`), the adapters are `<layer>.lora_A` / `<layer>.lora_B`.
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Any

import torch
from torch import nn

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.train.spec import ReLoRASpec

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_layers(model: nn.Module) -> list[Any]:
    """The model's `LoRALinear` layers, in module order."""
    from litgpt.lora import LoRALinear

    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]


def attach(model: nn.Module, cfg: ReLoRASpec, seed: int) -> list[str]:
    """Wrap every block linear layer matching `cfg.targets` in a LoRALinear; its base weight leaves
    the optimizer (it changes only at merges), the adapters join it. Returns the adapter names."""
    from litgpt.lora import LoRALinear

    blocks = list(model.transformer.h)
    hits = dict.fromkeys(cfg.targets, 0)
    names: list[str] = []
    for b, block in enumerate(blocks):
        for name, linear in block_linears(block):
            matched = [p for p in cfg.targets if fnmatch.fnmatchcase(name, p)]
            if not matched:
                continue
            for pattern in matched:
                hits[pattern] += 1
            weight = linear.weight
            with torch.random.fork_rng(devices=[]):  # LoRALinear's own init draws from the global RNG
                layer = LoRALinear(
                    linear.in_features, linear.out_features, r=cfg.rank, lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                    lora_dropout=cfg.dropout, bias=False, device="meta",
                )
            layer.linear = linear
            layer.lora_A.data = layer.lora_A.data.to(weight.device, weight.dtype)
            layer.lora_B.data = layer.lora_B.data.to(weight.device, weight.dtype)
            weight.requires_grad_(False)
            parent_name, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, layer)
            names += [f"transformer.h.{b}.{name}{s}" for s in ADAPTER_SUFFIXES]
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        examples = ", ".join(n for n, _ in block_linears(blocks[0])) if blocks else "none"
        raise ConfigError(
            f"relora.targets: pattern {missing[0]!r} matches no linear layer of the transformer blocks "
            f"(a block's linear layers: {examples})"
        )
    init_adapters(model, seed, cycle=0)
    return names


def _cycle_seed(seed: int, cycle: int, index: int) -> int:
    digest = hashlib.sha256(f"relora/{seed}/{cycle}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_adapters(model: nn.Module, seed: int, cycle: int) -> None:
    """Fresh adapters for merge cycle `cycle` (litgpt's `reset_parameters`, seeded per layer)."""
    for index, layer in enumerate(adapter_layers(model)):
        device = layer.lora_A.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(_cycle_seed(seed, cycle, index))
            layer.reset_parameters()


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Add every adapter's update into its base weight (litgpt's `merge`); the layer stays live."""
    for layer in adapter_layers(model):
        layer.merge()
        layer.merged = False  # keep the adapter branch in the forward pass for the next cycle


@torch.no_grad()
def reset_moments(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], share: float) -> None:
    """Zero `share` of each tensor's AdamW state entries, those with the smallest first moment
    (|exp_avg|) first: ReLoRA's magnitude pruning; `share=1` is a full reset.

    One mask for both moments: an entry keeps its exp_avg and its exp_avg_sq, or loses both. Pruning
    each moment on its own magnitude (as the paper's code does) keeps first moments whose second
    moment was zeroed, and the next update divides them by about eps (seen here: the gradient norm of
    SmolLM2-135M's stage 6 went from 4 to 38 two steps after a merge)."""
    if share <= 0:
        return
    for param in tensors:
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state:
            continue
        moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        k = int(share * moments[0].numel())
        if share >= 1 or k >= moments[0].numel():
            for moment in moments:
                moment.zero_()
        elif k > 0:
            magnitude = moments[0].abs()
            threshold = magnitude.flatten().float().kthvalue(k).values.to(magnitude.dtype)
            pruned = magnitude <= threshold
            for moment in moments:
                moment.masked_fill_(pruned, 0)


def restart_factor(step: int, cfg: ReLoRASpec) -> float:
    """The jagged schedule's factor on update `step` (0-based): after each merge the learning rate
    climbs back linearly over `warmup_after_merge` updates (the first cycle keeps the stage's warmup)."""
    if step < cfg.merge_every or cfg.warmup_after_merge == 0:
        return 1.0
    return min(1.0, (step % cfg.merge_every + 1) / cfg.warmup_after_merge)


def cycle_position(step: int, total: int, cfg: ReLoRASpec) -> dict[str, int]:
    """Where `step` completed updates sit in the merge cycle (saved with every train-state)."""
    merges = min(step, total - 1) // cfg.merge_every
    return {"merges": merges, "cycle": merges, "position": step - merges * cfg.merge_every}


def optimizer_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of AdamW's two moments for these parameters (in the parameters' dtype)."""
    return sum(2 * t.numel() * t.element_size() for t in tensors)
