"""What each stage of a recipe needs per GPU, before anything is downloaded or rented.

`plan_recipe(recipe, gpu, world)` builds the model on the meta device from its
litgpt config (the recipe's `base_model.litgpt_name`, the hub repo's name, or the tiny model's
shape) at the recipe's vocabulary size, applies each stage's trainable policy and ReLoRA with the
same code a stage runs, and counts bytes per GPU:

* weights, gradients and AdamW's two moments: the ZeRO paper's accounting (Rajbhandari et al. 2020,
  "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 3.1): 2 bytes per
  parameter for bf16 weights, 4 for fp32 (`32-true` and `bf16-mixed` keep fp32 weights), gradients in
  the weights' dtype for the tensors that train, two moments in the weights' dtype (torch's AdamW)
  for the tensors in the optimizer (ReLoRA: its adapters instead of the targeted weights). Under
  FSDP each is divided by the GPUs; two units (transformer blocks, or the embedding table) are
  gathered whole at a time (the one computing and the one prefetched).
* activations: the tensors each transformer block keeps for its backward pass, counted tensor by
  tensor in the manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", section 4.1), for litgpt's LLaMA-style block with SDPA attention (no s x s
  scores kept): per token, the norm inputs and outputs (4h), q, k and v after the key/value heads
  are expanded (3h), the attention output (h) and the MLP's four intermediate tensors (4 x
  intermediate). With activation checkpointing a block keeps only its input (h per token) and one
  block's full activations exist during its recomputation.
* `new-embeddings`: the whole table assembled from its frozen and new rows in each forward, and
  that table's gradient, counted with the activations.
* logits and loss: one chunk of `loss_chunk` positions (or the whole sequence) of bf16 logits, their
  fp32 copy and the fp32 gradient: 10 bytes per position and vocabulary entry.
* DDP over several GPUs: its gradient buckets, a second copy of the gradients.
* a fixed reserve for the CUDA context, cuBLAS workspaces and NCCL buffers.

Throughput: training FLOPs per token, forward 2N + 2 x layers x seq x width (Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", table 1), backward twice the forward's activation
gradients plus 2 N_trainable for the weight gradients (a frozen block still passes gradients
through), a forward more under activation checkpointing; tokens/s = MFU x peak bf16 FLOPs x GPUs /
FLOPs per token.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace
from typing import Any

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.train.microbatch import candidates

GiB = 1 << 30
HEADROOM = 0.10
CUDA_RESERVE = 1 * GiB
DEFAULT_MFU = 0.40
LOGIT_BYTES = 10  # bf16 logits + their fp32 copy + the fp32 gradient, per position and vocabulary entry


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what the driver reports as total
    bf16_tflops: float  # dense, without sparsity


# Totals as nvidia-smi reports them; peak dense bf16 from NVIDIA's datasheets (H100 SXM, H200 SXM,
# A100 SXM, L4).
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("NVIDIA H100 80GB HBM3", 81_559 << 20, 989.0),
    "h200-141gb": GPU("NVIDIA H200 141GB HBM3e", 143_771 << 20, 989.0),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40_960 << 20, 312.0),
    "a100-80gb": GPU("NVIDIA A100 80GB", 81_920 << 20, 312.0),
    "l4-24gb": GPU("NVIDIA L4 24GB", 23_034 << 20, 121.0),
}


def find_gpu(name: str, extra: dict[str, Any] | None = None) -> GPU:
    """A GPU of the built-in table or of a recipe's own (`compute.gpus`: name -> memory_gib,
    bf16_tflops); ConfigError naming the known ones otherwise."""
    table = dict(GPUS)
    for key, spec in (extra or {}).items():
        table[key] = GPU(key, int(spec.memory_gib * GiB), spec.bf16_tflops)
    if name not in table:
        raise ConfigError(f"unknown GPU {name!r}: choose one of {', '.join(sorted(table))} "
                          "(or add it under compute.gpus)")
    return table[name]


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a model: its litgpt config and parameter counts by name."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    intermediate_size: int
    padded_vocab: int
    sizes: dict[str, int]  # parameter name -> elements, the tied table counted once
    block_params: int  # one transformer block's parameters

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


@dataclass
class Parts:
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0
    fsdp_buffers: int = 0
    ddp_buckets: int = 0
    reserve: int = CUDA_RESERVE

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.fsdp_buffers + self.ddp_buckets + self.reserve)

    def largest(self) -> tuple[str, int]:
        named = {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer,
                 "activations": self.activations, "logits and loss": self.logits,
                 "FSDP gather buffers": self.fsdp_buffers, "DDP gradient buckets": self.ddp_buckets}
        name = max(named, key=lambda k: named[k])
        return name, named[name]


@dataclass
class StagePlan:
    stage: str
    trainable_params: int
    optimizer_params: int
    strategy: str
    world: int
    per_device_batch: int
    micro_batch: int  # as the recipe sets it
    activation_checkpointing: bool
    parts: Parts  # at the recipe's micro-batch
    activations_checkpointed: int  # the activations at that micro-batch with checkpointing
    max_micro_batch: int | None  # the largest that fits with HEADROOM to spare; None: not even one
    flops_per_token: float
    tokens_per_s: float
    hours: float
    gpu_hours: float
    fits: bool
    remedies: list[str] = field(default_factory=list)


def model_config(recipe: Any) -> tuple[Any, int]:
    """The litgpt config of the extended model a recipe trains, and the base model's vocabulary size:
    from the tiny model's shape, or litgpt's config named `base_model.litgpt_name` (default: the hub
    repo's or folder's last path part), without downloading anything."""
    from litgpt import Config

    source = recipe.base_model.source
    vocab = recipe.tokenizer.target_vocab_size
    if source.kind == "tiny":
        from vinasmol_core.builtin.fixtures import smollm2_config

        shape = source.model_dump(exclude={"kind", "vocab_size", "seed"})
        return smollm2_config(vocab, **shape), source.vocab_size
    name = recipe.base_model.litgpt_name or str(getattr(source, "repo", "") or getattr(source, "path", ""))
    name = name.rstrip("/").rsplit("/", 1)[-1]
    try:
        config = Config.from_name(name)
    except (ValueError, KeyError):
        raise ConfigError(
            f"base_model.litgpt_name: litgpt has no config named {name!r}; name one (e.g. SmolLM2-360M) "
            "so that the planner knows the model's shape"
        ) from None
    return replace(config, vocab_size=vocab, padded_vocab_size=vocab), config.vocab_size


def model_on_meta(config: Any) -> Any:
    """litgpt's GPT for `config` on the meta device, tied (no memory, exact parameter names)."""
    import torch
    from litgpt.model import GPT

    from vinasmol_core.train import params

    with torch.device("meta"):
        model = GPT(config)
    params.tie_embeddings(model)
    return model


def shape_of(config: Any) -> Shape:
    from vinasmol_core.train import params

    model = model_on_meta(config)
    sizes = {n: p.numel() for n, p in params.named_parameters(model).items() if n != params.HEAD}
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return Shape(config.n_layer, config.n_embd, config.n_head, config.head_size, config.intermediate_size,
                 config.padded_vocab_size, sizes, block)


def trainable_counts(config: Any, stage: Any, base_vocab: int | None) -> tuple[int, int]:
    """(parameters the stage changes, parameters in the optimizer): the stage's own policy applied to a
    meta-device model; with ReLoRA the targeted block linear layers leave the optimizer and their
    adapters (rank x (in + out) each) join it."""
    from vinasmol_core.train import params, relora

    model = model_on_meta(config)
    params.apply_policy(model, stage.trainable, base_vocab)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if stage.relora is None:
        return trainable, trainable
    targeted = adapters = 0
    for block in model.transformer.h:
        for name, linear in relora.block_linears(block):
            hit = any(fnmatch.fnmatchcase(name, t) for t in stage.relora.targets)
            if hit and linear.weight.requires_grad:
                targeted += linear.weight.numel()
                adapters += stage.relora.rank * (linear.in_features + linear.out_features)
    return trainable, trainable - targeted + adapters


def activation_bytes(shape: Shape, config: Any, micro_batch: int, seq_len: int, act_bytes: int,
                     checkpointing: bool) -> int:
    """The blocks' saved activations for one micro-batch (module docstring)."""
    h, inter = shape.n_embd, shape.intermediate_size
    attn = config.n_head * config.head_size
    per_token_block = 4 * h + 3 * attn + attn + 4 * inter  # norms, q/k/v (expanded), SDPA out, MLP
    tokens = micro_batch * seq_len
    full_block = tokens * per_token_block * act_bytes
    if checkpointing:
        return shape.n_layer * tokens * h * act_bytes + full_block
    return shape.n_layer * full_block + tokens * h * act_bytes  # + the embedding output


def stage_memory(shape: Shape, config: Any, stage: Any, trainable: int, in_optimizer: int, world: int,
                 strategy: str, micro_batch: int, checkpointing: bool) -> Parts:
    wb = 2 if stage.precision == "bf16-true" else 4
    act = 4 if stage.precision == "32-true" else 2
    shards = world if strategy == "fsdp" else 1
    parts = Parts()
    parts.weights = math.ceil(shape.total * wb / shards)
    parts.gradients = math.ceil(in_optimizer * wb / shards)  # what the optimizer holds gets a gradient
    parts.optimizer = math.ceil(2 * in_optimizer * wb / shards)
    parts.activations = activation_bytes(shape, config, micro_batch, stage.seq_len, act, checkpointing)
    if stage.trainable == "new-embeddings":  # the table assembled from frozen and new rows, and its gradient
        parts.activations += 2 * shape.padded_vocab * shape.n_embd * wb
    chunk = stage.loss_chunk if stage.loss_chunk > 0 and strategy != "fsdp" else stage.seq_len
    parts.logits = micro_batch * min(chunk, stage.seq_len) * shape.padded_vocab * LOGIT_BYTES
    if strategy == "fsdp" and world > 1:
        embed = shape.padded_vocab * shape.n_embd
        parts.fsdp_buffers = 2 * max(shape.block_params, embed) * wb
    if strategy == "ddp" and world > 1:
        parts.ddp_buckets = parts.gradients
    return parts


def flops_per_token(shape: Shape, seq_len: int, trainable: int, checkpointing: bool) -> float:
    forward = 2.0 * shape.total + 2.0 * shape.n_layer * seq_len * shape.n_embd
    total = forward + 2.0 * forward - 2.0 * shape.total + 2.0 * trainable  # activation + weight gradients
    return total + (forward if checkpointing else 0.0)


def _strategy(stage: Any, world: int, n_params: int) -> str:
    if world == 1:
        return "single"
    if stage.strategy != "auto":
        return stage.strategy
    from vinasmol_core.train.runtime import FSDP_MIN_PARAMS

    return "fsdp" if n_params >= FSDP_MIN_PARAMS else "ddp"


def plan_stage(stage: Any, config: Any, base_vocab: int, shape: Shape, gpu: GPU, world: int,
               mfu: float) -> StagePlan:
    """One stage's memory per GPU, largest micro-batch, tokens/s and hours on `world` GPUs."""
    base_vocab = stage.base_vocab_size or base_vocab
    trainable, in_optimizer = trainable_counts(config, stage, base_vocab)
    strategy = _strategy(stage, world, shape.total)
    per_device = max(stage.global_batch // world, 1)
    ckpt = stage.activation_checkpointing
    capacity = (1.0 - HEADROOM) * gpu.memory_bytes

    def parts_at(micro: int, checkpointing: bool = ckpt, strat: str = strategy) -> Parts:
        return stage_memory(shape, config, stage, trainable, in_optimizer, world, strat, micro, checkpointing)

    parts = parts_at(stage.micro_batch)
    fitting = [m for m in candidates(per_device) if parts_at(m).total <= capacity]
    max_micro = max(fitting) if fitting else None
    fpt = flops_per_token(shape, stage.seq_len, trainable, ckpt)
    tps = mfu * gpu.bf16_tflops * 1e12 * world / fpt
    hours = stage.max_tokens / tps / 3600
    plan = StagePlan(
        stage=stage.name, trainable_params=trainable, optimizer_params=in_optimizer, strategy=strategy,
        world=world, per_device_batch=per_device, micro_batch=stage.micro_batch,
        activation_checkpointing=ckpt,
        parts=parts, activations_checkpointed=parts_at(stage.micro_batch, True).activations,
        max_micro_batch=max_micro, flops_per_token=fpt, tokens_per_s=tps, hours=hours,
        gpu_hours=hours * world, fits=parts.total <= capacity,
    )
    if not plan.fits:
        plan.remedies = _remedies(plan, parts_at, capacity, stage, world)
    return plan


def _remedies(plan: StagePlan, parts_at: Any, capacity: float, stage: Any, world: int) -> list[str]:
    out = []
    if plan.max_micro_batch is not None:
        out.append(f"--set 'stages[{stage.name}].micro_batch={plan.max_micro_batch}'")
    if not plan.activation_checkpointing and parts_at(1, True).total <= capacity:
        out.append(f"activation checkpointing (--set 'stages[{stage.name}].activation_checkpointing=true')")
    if world > 1 and plan.strategy != "fsdp" and parts_at(1, strat="fsdp").total <= capacity:
        out.append(f"FSDP over the {world} GPUs (--set 'stages[{stage.name}].strategy=fsdp')")
    if world > 1 and parts_at(1, True, "fsdp").total <= capacity and not out:
        out.append("FSDP with activation checkpointing")
    one = parts_at(1)
    if stage.relora is None and stage.trainable in ("all", "transformer") and (
        one.total - one.optimizer - one.gradients <= capacity
    ):
        out.append(f"ReLoRA on {stage.name} (its gradients and optimizer state: the adapters' only)")
    out.append("more GPUs (--nodes, --gpus-per-node) with FSDP, or a GPU with more memory")
    return out


def plan_recipe(recipe: Any, gpu: GPU, world: int, mfu: float = DEFAULT_MFU) -> list[StagePlan]:
    """Every stage of `recipe` on `world` GPUs of kind `gpu`."""
    config, base_vocab = model_config(recipe)
    shape = shape_of(config)
    return [plan_stage(s, config, base_vocab, shape, gpu, world, mfu) for s in recipe.stages]


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def does_not_fit(plan: StagePlan, gpu: GPU) -> str:
    """The line that says why a stage does not fit and what would make it."""
    part, size = plan.parts.largest()
    usable = (1.0 - HEADROOM) * gpu.memory_bytes
    return (
        f"does not fit: stage {plan.stage} needs {_gib(plan.parts.total)} GiB per GPU at micro-batch "
        f"{plan.micro_batch} on {gpu.name} ({_gib(int(usable))} GiB usable with {HEADROOM:.0%} to spare); "
        f"the largest part is {part} ({_gib(size)} GiB). Would fit with: {'; '.join(plan.remedies)}"
    )


def format_plan(plans: list[StagePlan], gpu: GPU, nodes: int, gpus_per_node: int, mfu: float) -> list[str]:
    """A markdown table of the plan (GiB per GPU), its totals and a line per stage that does not fit."""
    world = nodes * gpus_per_node
    lines = [
        f"Plan on {nodes} node(s) x {gpus_per_node} {gpu.name} ({_gib(gpu.memory_bytes)} GiB, "
        f"{gpu.bf16_tflops:g} bf16 TFLOPs each) at {mfu:.0%} MFU; memory per GPU in GiB at the recipe's "
        "micro-batch (act. ckpt: the activations with activation checkpointing).",
        "",
        "| stage | strategy | trainable | weights | grads | optimizer | activations | act. ckpt | logits "
        "| FSDP buffers | peak | fits | largest micro-batch | tokens/s | hours | GPU-hours |",
        "| --- | --- |" + " ---: |" * 9 + " --- |" + " ---: |" * 4,
    ]
    for p in plans:
        q = p.parts
        lines.append(
            f"| {p.stage} | {p.strategy} | {p.trainable_params:,} | {_gib(q.weights)} | {_gib(q.gradients)} "
            f"| {_gib(q.optimizer)} | {_gib(q.activations)} | {_gib(p.activations_checkpointed)} "
            f"| {_gib(q.logits)} | {_gib(q.fsdp_buffers)} | {_gib(q.total)} | {'yes' if p.fits else 'NO'} "
            f"| {p.max_micro_batch or '-'} | {p.tokens_per_s:,.0f} | {p.hours:,.1f} | {p.gpu_hours:,.1f} |"
        )
    hours = sum(p.hours for p in plans)
    lines += ["", f"all stages: {hours:,.1f} hours on {world} GPU(s), {hours * world:,.1f} GPU-hours"]
    lines += [does_not_fit(p, gpu) for p in plans if not p.fits]
    return lines
