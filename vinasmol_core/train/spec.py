"""What a training stage is: a validated `StageSpec`, and the `StageJob` that binds it to its inputs.

A stage is one process (or one torchrun group) that starts from a litgpt checkpoint artifact, trains
the tensors its trainable policy selects on a data mixture for a token budget, publishes train-state
checkpoints as it goes and a plain litgpt checkpoint at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vinasmol_core.common.errors import ConfigError

POLICIES = ("new-embeddings", "embeddings", "all", "transformer")
Policy = Literal["new-embeddings", "embeddings", "all", "transformer"]
Schedule = Literal["cosine", "warmup-stable-decay", "linear"]
Precision = Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"]

# Fields that change how a stage runs but not what it computes: a stage resumed with other values
# of these still continues the same training run.
OPERATIONAL_FIELDS = frozenset(
    {
        "checkpoint_interval",
        "async_checkpoints",
        "eval_interval",
        "eval_sequences",
        "eval_languages",
        "eval_at_start",
        "log_interval",
        "devices",
        "nodes",
        "strategy",
        "accelerator",
        "compile",
        "activation_checkpointing",
        "loss_chunk",
        "fused_adamw",
        "deterministic",
        "cpu_threads",
        "keep_checkpoints",
        "step_timeout",
        "micro_batch_search",
    }
)


class ReLoRASpec(BaseModel):
    """ReLoRA (arXiv 2307.05695): the targeted linear layers train through low-rank adapters (litgpt's
    `LoRALinear`) that are merged into the base weights every `merge_every` steps and started afresh,
    so the update accumulated over a stage is of full rank."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=128, gt=0, description="adapter rank r")
    alpha: float | None = Field(
        default=None,
        gt=0,
        description="an adapter adds (B @ A) * alpha / rank; default 4 x rank. At the stage's learning "
        "rate the adapters need that scale to keep up with full rank (bench/relora_quality.py)",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(
        default_factory=lambda: ["attn.*", "mlp.*"],
        min_length=1,
        description="fnmatch patterns over a block's linear layers (attn.qkv, attn.proj, mlp.fc_1, ...)",
    )
    merge_every: int = Field(default=1000, gt=0, description="optimizer steps between merges")
    optimizer_reset: float = Field(
        default=0.99,
        ge=0,
        le=1,
        description="share of each adapter's AdamW entries zeroed at a merge, smallest |exp_avg| first, "
        "both moments under one mask (0.99: the paper's pruning; 1: a full reset; 0: kept)",
    )
    warmup_after_merge: int = Field(
        default=50, ge=0, description="steps of linear learning-rate warmup after each merge (jagged)"
    )

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        if any(not p for p in value):
            raise ValueError("targets must be non-empty patterns")
        return value

    @model_validator(mode="after")
    def _default_alpha(self) -> ReLoRASpec:
        if self.alpha is None:
            self.alpha = 4.0 * self.rank
        return self


class MicroBatchSearch(BaseModel):
    """A smoke run's search for the full run's micro-batch (`vinasmol_core.train.microbatch`)."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(gt=0, description="the full run's sequence length, at which memory is measured")
    max_micro_batch: int = Field(gt=0, description="the full run's batch per device: the largest candidate")


class StageSpec(BaseModel):
    """Everything that defines one training stage. Cross-field rules are checked by `check()`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    trainable: Policy | list[str] = Field(
        description="new-embeddings | embeddings | all | transformer, or parameter name patterns (fnmatch)"
    )
    base_vocab_size: int | None = Field(
        default=None, gt=0, description="rows below it are the base vocabulary (new-embeddings policy)"
    )
    # optimisation
    lr: float = Field(gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    schedule: Schedule = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="warmup-stable-decay: share of steps")
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    # budget and batch
    max_tokens: int = Field(gt=0, description="token budget; steps = max_tokens // (global_batch * seq_len)")
    seq_len: int = Field(default=2048, gt=0)
    global_batch: int = Field(default=64, gt=0, description="sequences per optimizer step, all devices")
    micro_batch: int = Field(default=2, gt=0, description="sequences per forward pass on one device")
    precision: Precision = "bf16-mixed"
    seed: int = 42
    # data
    mixture: dict[str, float] = Field(description="sampling weight per language tag, role or source")
    long_context: dict[str, Any] | None = Field(default=None, description="long-document up-sampling spec")
    relora: ReLoRASpec | None = Field(
        default=None, description="train the transformer's linear layers through merged low-rank adapters"
    )
    # model geometry
    rope_base: float | None = Field(default=None, gt=0)
    rope_adjustments: dict[str, Any] | None = None
    block_size: int | None = Field(
        default=None, gt=0, description="new context window (written to the config)"
    )
    # evaluation and checkpoints
    checkpoint_interval: int = Field(default=100, gt=0, description="optimizer steps between train-states")
    async_checkpoints: bool = Field(
        default=True,
        description="write, hash and upload train-states in a background thread (the step loop only "
        "copies the state to host memory); False: publish them while training waits",
    )
    keep_checkpoints: int | None = Field(
        default=3,
        gt=0,
        description="newest train-state refs kept per stage (None: all); older refs are deleted",
    )
    eval_interval: int = Field(default=100, gt=0)
    eval_sequences: int = Field(default=16, ge=0, description="validation sequences per language")
    eval_languages: list[str] | None = Field(
        default=None, description="default: language keys of the mixture"
    )
    eval_at_start: bool = True
    log_interval: int = Field(default=1, gt=0)
    # hardware
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = Field(default=1, gt=0)
    nodes: int = Field(default=1, gt=0)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    compile: bool | Literal["auto"] = Field(
        default="auto", description="torch.compile the model; auto: on CUDA, off on the CPU"
    )
    activation_checkpointing: bool = False
    loss_chunk: int = Field(
        default=256,
        ge=0,
        description="sequence positions per chunk of the lm_head and cross-entropy (recomputed in the "
        "backward pass, so the micro-batch's full fp32 logits never exist); 0: the whole micro-batch",
    )
    fused_adamw: bool | None = Field(default=None, description="fused AdamW kernel; default: on")
    deterministic: bool | None = Field(default=None, description="default: on for the CPU")
    cpu_threads: int | None = Field(default=None, gt=0, description="torch threads per process on the CPU")
    micro_batch_search: MicroBatchSearch | None = Field(
        default=None,
        description="after training, find the largest micro-batch that fits the device at this sequence "
        "length (set by the smoke run; on CUDA, or on the CPU with $VINASMOL_DEVICE_MEMORY)",
    )
    step_timeout: float | None = Field(
        default=None,
        gt=0,
        description="seconds a rank may go without completing an optimizer step before its stage process "
        "is ended (a hung rank or collective); default: 10 x the median step time, at least 600",
    )

    @field_validator("mixture")
    @classmethod
    def _mixture(cls, mixture: dict[str, float]) -> dict[str, float]:
        if not mixture:
            raise ValueError("mixture needs at least one weight")
        for key, weight in mixture.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"mixture weight for {key!r} must be a finite number >= 0, got {weight}")
        if sum(mixture.values()) <= 0:
            raise ValueError("mixture weights sum to 0")
        return mixture

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: Precision) -> Precision:
        if value == "16-mixed":
            raise ValueError(
                "precision 16-mixed is not supported (fp16 needs a gradient scaler that skips "
                "overflowing steps); use bf16-mixed where the GPU has bf16 (A100, H100, L4, RTX 30xx "
                "and newer) or 32-true (V100, T4)"
            )
        return value

    @field_validator("trainable")
    @classmethod
    def _patterns(cls, value: Policy | list[str]) -> Policy | list[str]:
        if isinstance(value, list) and (not value or any(not p for p in value)):
            raise ValueError("trainable patterns must be a non-empty list of non-empty patterns")
        return value

    # ----------------------------------------------------------------- derived quantities
    @property
    def world_size(self) -> int:
        return self.devices * self.nodes

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def total_steps(self) -> int:
        return self.max_tokens // self.tokens_per_step

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.world_size * self.micro_batch)

    def check(self) -> None:
        """Raise ConfigError for rules that involve several fields (the model-free part of validation)."""
        per_device, rest = divmod(self.global_batch, self.world_size)
        if rest:
            raise ConfigError(
                f"stage {self.name}: global_batch={self.global_batch} is not divisible by the "
                f"{self.world_size} devices (devices x nodes)"
            )
        if per_device % self.micro_batch:
            raise ConfigError(
                f"stage {self.name}: micro_batch={self.micro_batch} does not divide the per-device batch "
                f"{per_device} (global_batch={self.global_batch} over {self.world_size} devices)"
            )
        if self.total_steps < 1:
            raise ConfigError(
                f"stage {self.name}: max_tokens={self.max_tokens} is smaller than one optimizer step "
                f"(global_batch x seq_len = {self.tokens_per_step} tokens)"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"stage {self.name}: min_lr={self.min_lr} is above lr={self.lr}")
        if self.block_size is not None and self.seq_len > self.block_size:
            raise ConfigError(
                f"stage {self.name}: seq_len={self.seq_len} is above block_size={self.block_size}"
            )
        self._check_relora()

    def _check_relora(self) -> None:
        relora = self.relora
        if relora is None:
            return
        if self.trainable not in ("all", "transformer"):
            raise ConfigError(
                f"stage {self.name}: relora needs trainable=all or trainable=transformer (the stage must "
                f"train the transformer's weights), got trainable={self.trainable!r}"
            )
        if self.strategy == "fsdp":
            self.check_strategy("fsdp")
        if relora.warmup_after_merge > relora.merge_every:
            raise ConfigError(
                f"stage {self.name}: relora.warmup_after_merge={relora.warmup_after_merge} is above "
                f"relora.merge_every={relora.merge_every}"
            )

    def check_strategy(self, resolved: str) -> None:
        """Refuse what the strategy a run resolved to cannot do: ReLoRA under FSDP, whether asked
        for or chosen by `strategy: auto` for a large model on several devices."""
        if self.relora is None or resolved != "fsdp":
            return
        how = (
            "strategy=fsdp"
            if self.strategy == "fsdp"
            else f"strategy={self.strategy}, which resolves to FSDP for this model on "
            f"{self.world_size} devices"
        )
        raise ConfigError(
            f"stage {self.name}: relora under FSDP is not supported yet ({how}; merging and re-initialising "
            "the adapters need whole weights, FSDP shards them): set strategy: ddp, or drop relora"
        )

    def math_fields(self) -> dict[str, Any]:
        """The fields that decide what the stage computes (used in the resume key)."""
        return self.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS))


class StageLogging(BaseModel):
    """Where a stage's metrics go besides metrics.jsonl (the recipe's `logging` section).

    None of these change what a stage computes: they are in no cache or resume key. The W&B API key
    is never a field: wandb reads `WANDB_API_KEY` from the environment of the training process."""

    model_config = ConfigDict(extra="forbid")

    artifact_interval: int = Field(
        default=50, gt=0, description="optimizer steps between versions of the stage's curves artifact"
    )
    csv: bool = Field(default=True, description="Fabric's CSVLogger: logs/csv/metrics.csv")
    tensorboard: bool = Field(default=True, description="Fabric's TensorBoardLogger: logs/tensorboard/")
    dir: str | None = Field(
        default=None,
        description="live log folder, one subfolder per stage and resume key; default $VINASMOL_LOG_DIR, "
        "else the stage's temporary work folder. The logs are copied into the final checkpoint either way",
    )
    wandb: bool = Field(default=False, description="Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = Field(default="vinasmol", min_length=1)
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline"] = "online"


class StageJob(BaseModel):
    """A stage bound to its inputs and outputs in the artifact store."""

    model_config = ConfigDict(extra="forbid")

    spec: StageSpec
    init_checkpoint: str = Field(description="store ref or digest of a litgpt checkpoint artifact")
    dataset: str = Field(description="store ref or digest of a dataset artifact")
    store_url: str | None = Field(default=None, description="default: $VINASMOL_STORE")
    out_ref: str = Field(default="", description="ref for the final checkpoint; default derived from the job")
    partial_ref_prefix: str = Field(
        default="",
        description="refs of train-state checkpoints (the resume key); default derived from the job",
    )
    fail_at_step: int | None = Field(default=None, description="debugging: SIGKILL itself after this step")
    logging: StageLogging = Field(default_factory=StageLogging)

    def resume_key(self, init_digest: str | None = None, dataset_digest: str | None = None) -> str:
        """sha256 over what the stage computes: its math fields and the digests of its inputs."""
        payload = {
            "spec": self.spec.math_fields(),
            "init": init_digest or self.init_checkpoint,
            "dataset": dataset_digest or self.dataset,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def resolved_refs(self, init_digest: str, dataset_digest: str) -> tuple[str, str]:
        """(out_ref, partial_ref_prefix), filling the defaults from the resume key."""
        key = self.resume_key(init_digest, dataset_digest)[:16]
        out_ref = self.out_ref or f"stages/{self.spec.name}/{key}"
        prefix = self.partial_ref_prefix or f"partial/{self.spec.name}/{key}"
        return out_ref, prefix.rstrip("/")


def _format_validation_error(exc: ValidationError, what: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or what
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


def parse_spec(data: dict[str, Any]) -> StageSpec:
    """Validate a stage spec, turning pydantic errors into one ConfigError naming the fields."""
    try:
        spec = StageSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "stage spec")) from None
    spec.check()
    return spec


def load_job(path: Path) -> StageJob:
    """Read and validate a job JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc}") from None
    try:
        job = StageJob.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, f"job file {path}")) from None
    job.spec.check()
    return job


# ------------------------------------------------------------------------- presets
_SHARED: dict[str, Any] = {
    "global_batch": 64,
    "micro_batch": 2,
    "seq_len": 2048,
    "warmup_steps": 10,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "precision": "bf16-mixed",
    "checkpoint_interval": 100,
    "eval_interval": 100,
    "mixture": {"vi": 0.55, "en": 0.40, "code": 0.05},
}

PRESETS: dict[str, dict[str, Any]] = {
    "eeve-3": {"trainable": "new-embeddings", "lr": 1e-3, "min_lr": 1e-5, "max_tokens": 200_000_000},
    "eeve-4": {"trainable": "embeddings", "lr": 5e-4, "min_lr": 1e-5, "max_tokens": 200_000_000},
    "eeve-6": {"trainable": "all", "lr": 2e-4, "min_lr": 1e-5, "max_tokens": 1_200_000_000},
    "eeve-7": {"trainable": "transformer", "lr": 1e-4, "min_lr": 1e-5, "max_tokens": 400_000_000},
    "cpt": {"trainable": "all", "lr": 2e-4, "min_lr": 1e-5, "max_tokens": 1_000_000_000},
    "context-extension": {
        "trainable": "all",
        "lr": 1e-4,
        "min_lr": 1e-5,
        "max_tokens": 200_000_000,
        "seq_len": 8192,
        "global_batch": 16,
        "micro_batch": 1,
        "rope_base": 100_000.0,
        "long_context": {},
    },
    "annealing": {
        "trainable": "all",
        "lr": 1e-4,
        "min_lr": 0.0,
        "schedule": "linear",
        "max_tokens": 500_000_000,
        "mixture": {"vi": 0.32, "en": 0.25, "code": 0.03, "annealing": 0.40},
    },
}


def preset(kind: str, **overrides: Any) -> StageSpec:
    """The recipe's default spec for a stage kind (see PRESETS), with overrides applied."""
    if kind not in PRESETS:
        raise ConfigError(f"unknown stage kind {kind!r}; choose from {', '.join(PRESETS)}")
    data = {**_SHARED, **PRESETS[kind], "name": kind, **overrides}
    return parse_spec(data)
