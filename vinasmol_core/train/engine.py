"""The stage runner: one process (or one rank of a torchrun group) training one stage.

Order of work: validate everything that can be checked without training (spec, checkpoint, dataset,
tokenizer, trainable patterns, sequence length), then resume from the newest train-state published
under the job's partial ref prefix (if any), train with Fabric, publish train-states every
`checkpoint_interval` steps and a plain litgpt checkpoint at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vinasmol_core.errors import ConfigError, VinaSmolError
from vinasmol_core.manifests import CheckpointManifest, DatasetManifest
from vinasmol_core.train import dist as D
from vinasmol_core.train import params as P
from vinasmol_core.train import state as S
from vinasmol_core.train.data import (
    TOKENIZER_FILES,
    batch_indices,
    check_data_matches_checkpoint,
    eval_languages,
    load_validation,
    open_sampler,
    token_byte_lengths,
    tokenizer_digest,
)
from vinasmol_core.train.metrics import RESULT_PREFIX, MetricsSink, plot_loss_curve, read_events
from vinasmol_core.train.schedule import learning_rate
from vinasmol_core.train.spec import StageJob, StageSpec

STEP_REF = re.compile(r"step-(\d+)$")


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Everything fetched and checked before training starts."""

    init_digest: str
    dataset_digest: str
    ckpt_dir: Path
    dataset_dir: Path
    init_manifest: CheckpointManifest
    dataset_manifest: DatasetManifest
    config: Any  # litgpt.Config, with the stage's RoPE settings applied
    base_vocab_size: int | None
    languages: list[str] = field(default_factory=list)


def stage_config(ckpt_dir: Path, spec: StageSpec) -> Any:
    """The checkpoint's litgpt Config with the stage's RoPE base, adjustments and block size."""
    from litgpt import Config

    path = ckpt_dir / "model_config.yaml"
    if not path.is_file():
        raise VinaSmolError(f"the initial checkpoint has no model_config.yaml ({ckpt_dir})")
    config = Config.from_file(path)
    if spec.rope_base is not None:
        config.rope_base = int(spec.rope_base) if float(spec.rope_base).is_integer() else spec.rope_base
    if spec.rope_adjustments is not None:
        config.rope_adjustments = dict(spec.rope_adjustments)
    if spec.block_size is not None:
        config.block_size = spec.block_size
    return config


def check_model_fits(spec: StageSpec, config: Any) -> None:
    if spec.seq_len > config.block_size:
        raise ConfigError(
            f"stage {spec.name}: seq_len={spec.seq_len} is above the model's block_size={config.block_size} "
            f"(RoPE base {config.rope_base}, adjustments {config.rope_adjustments}); set block_size and "
            "rope settings in the stage spec to extend the context"
        )
    if config.rope_adjustments:
        from litgpt.model import GPT

        try:
            GPT.rope_cache(_RopeProbe(config, spec.seq_len))  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"stage {spec.name}: rope_adjustments {config.rope_adjustments}: {exc}"
            ) from None


class _RopeProbe:
    """Just enough of a GPT for `GPT.rope_cache` to validate rope_adjustments."""

    def __init__(self, config: Any, seq_len: int) -> None:
        self.config = config
        self.max_seq_length = seq_len


def prepare_inputs(job: StageJob, store: Any) -> Inputs:
    """Fetch the initial checkpoint and the dataset; check they fit the spec and each other."""
    spec = job.spec
    spec.check()
    init_digest = store.resolve(job.init_checkpoint)
    dataset_digest = store.resolve(job.dataset)
    init_manifest = store.get_manifest(init_digest)
    if not isinstance(init_manifest, CheckpointManifest) or init_manifest.format != "litgpt":
        kind = getattr(init_manifest, "format", init_manifest.kind)
        raise ConfigError(
            f"init_checkpoint {job.init_checkpoint} is a {kind} artifact, not a litgpt checkpoint"
        )
    dataset_manifest = store.get_manifest(dataset_digest)
    if not isinstance(dataset_manifest, DatasetManifest):
        raise ConfigError(f"dataset {job.dataset} is a {dataset_manifest.kind} artifact, not a dataset")
    ckpt_dir = Path(store.fetch(init_digest))
    dataset_dir = Path(store.fetch(dataset_digest))
    config = stage_config(ckpt_dir, spec)
    check_model_fits(spec, config)
    check_data_matches_checkpoint(dataset_dir, ckpt_dir, dataset_manifest.tokenizer_digest, config.vocab_size)
    base_vocab = spec.base_vocab_size or P.find_base_vocab_size(ckpt_dir, init_manifest.extra)
    # the policy on a meta-device model: pattern errors before any tensor is loaded
    from litgpt.model import GPT

    with torch.device("meta"):
        probe = GPT(config)
    P.tie_embeddings(probe)
    P.apply_policy(probe, spec.trainable, base_vocab)
    counts = dataset_manifest.token_counts
    available = {k[4:] for k, v in counts.items() if k.startswith("val/") and v > 0} or None
    languages = eval_languages(spec.mixture, spec.eval_languages, available)
    return Inputs(
        init_digest=init_digest,
        dataset_digest=dataset_digest,
        ckpt_dir=ckpt_dir,
        dataset_dir=dataset_dir,
        init_manifest=init_manifest,
        dataset_manifest=dataset_manifest,
        config=config,
        base_vocab_size=base_vocab,
        languages=languages,
    )


def validate_job(job: StageJob, store: Any | None = None) -> Inputs:
    """Every check a stage makes before training, without starting it (no Fabric, no weights)."""
    from vinasmol_core.store import ArtifactStore

    inputs = prepare_inputs(job, store or ArtifactStore(job.store_url))
    open_sampler(
        inputs.dataset_dir,
        job.spec.mixture,
        job.spec.seq_len,
        seed=job.spec.seed,
        stage=job.spec.name,
        long_context=job.spec.long_context,
    ).sequence(0)
    return inputs


def find_resume(store: Any, prefix: str, resume_key: str) -> tuple[int, str] | None:
    """(step, digest) of the newest train-state under `prefix` made by this same stage, or None."""
    found: list[tuple[int, str]] = []
    for ref, digest in store.list_refs(prefix + "/").items():
        m = STEP_REF.search(ref)
        if m and ref.startswith(prefix + "/"):
            found.append((int(m.group(1)), digest))
    for step, digest in sorted(found, reverse=True):
        manifest = store.get_manifest(digest)
        if (
            isinstance(manifest, CheckpointManifest)
            and manifest.format == "train-state"
            and manifest.extra.get("resume_key") == resume_key
        ):
            return step, digest
    return None


# ----------------------------------------------------------------------------- runtime helpers
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


def make_fabric(spec: StageSpec, accelerator: str) -> Any:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy, FSDPStrategy

    strategy: Any = "auto"
    if spec.strategy == "fsdp" and accelerator != "cuda":
        raise ConfigError(
            f"stage {spec.name}: strategy=fsdp needs CUDA devices (Lightning Fabric has no FSDP on the CPU); "
            "use strategy=ddp"
        )
    if spec.strategy == "fsdp":
        from litgpt.model import Block

        strategy = FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if spec.activation_checkpointing else None,
            state_dict_type="full",
            sharding_strategy="FULL_SHARD",
            use_orig_params=True,
        )
    elif spec.world_size > 1 or spec.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="nccl" if accelerator == "cuda" else "gloo")
    return Fabric(
        accelerator=accelerator,
        devices=spec.devices,
        num_nodes=spec.nodes,
        strategy=strategy,
        precision=spec.precision,
    )


@contextlib.contextmanager
def local_rank_zero_first(fabric: Any) -> Iterator[None]:
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


def make_optimizer(
    model: Any, spec: StageSpec, accelerator: str
) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """AdamW over the trainable tensors only; no weight decay on vectors (norms, biases)."""
    named = {n: p for n, p in P.named_parameters(model).items() if p.requires_grad}
    decay = [p for n, p in sorted(named.items()) if p.ndim >= 2]
    no_decay = [p for n, p in sorted(named.items()) if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = spec.fused_adamw if spec.fused_adamw is not None else accelerator == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=fused or None)
    return optimizer, {id(p): n for n, p in named.items()}


def _gather_bytes(fabric: Any, blob: bytes) -> list[bytes]:
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


def _sequences(sampler: Any, indices: list[int]) -> np.ndarray:
    return np.stack([np.asarray(sampler.sequence(i), dtype=np.int64) for i in indices])


def first_batch_digest(sampler: Any, global_batch: int) -> str:
    h = hashlib.sha256()
    for i in range(global_batch):
        h.update(np.ascontiguousarray(np.asarray(sampler.sequence(i), dtype=np.int64)).tobytes())
    return h.hexdigest()


def optimizer_step(
    fabric: Any,
    model: Any,
    optimizer: Any,
    batches: Iterator[torch.Tensor],
    accum: int,
    vocab: int,
    grad_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update over `accum` micro-batches of (seq_len + 1)-token rows.

    Returns (mean loss over all ranks, gradient norm before clipping)."""
    loss_sum = torch.zeros((), device=fabric.device)
    for micro, batch in enumerate(batches):
        batch = batch.to(fabric.device)
        x, y = batch[:, :-1], batch[:, 1:]
        with fabric.no_backward_sync(model, enabled=micro < accum - 1):
            logits = model(x)
            loss = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab).float(), y.reshape(-1))
            fabric.backward(loss / accum)
        loss_sum += loss.detach()
    # with max_norm=inf the gradients are multiplied by exactly 1.0: the norm is measured, nothing clipped
    grad_norm = fabric.clip_gradients(
        model, optimizer, max_norm=grad_clip if grad_clip is not None else math.inf
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return fabric.all_reduce(loss_sum / accum, reduce_op="mean"), grad_norm


# ----------------------------------------------------------------------------- the stage
class StageRunner:
    """Runs one stage inside a launched Fabric (one instance per rank)."""

    def __init__(self, job: StageJob, metrics_copy: Path | None = None, store: Any | None = None) -> None:
        self.job = job
        self.spec = job.spec
        self.metrics_copy = metrics_copy
        self._store = store

    # ------------------------------------------------------------------ setup
    def run(self) -> CheckpointManifest | None:
        from vinasmol_core.store import ArtifactStore

        spec = self.spec
        spec.check()
        accelerator = configure_runtime(spec)
        fabric = make_fabric(spec, accelerator)
        fabric.launch()
        self.fabric = fabric
        store = self._store if self._store is not None else ArtifactStore(self.job.store_url)
        self.store = store
        with local_rank_zero_first(fabric):
            inputs = prepare_inputs(self.job, store)
        self.inputs = inputs
        self.resume_key = self.job.resume_key(inputs.init_digest, inputs.dataset_digest)
        self.out_ref, self.prefix = self.job.resolved_refs(inputs.init_digest, inputs.dataset_digest)
        self.work = Path(tempfile.mkdtemp(prefix=f"vinasmol-{spec.name}-"))
        try:
            return self._run(fabric, store, inputs)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self, fabric: Any, store: Any, inputs: Inputs) -> CheckpointManifest | None:
        from litgpt.model import GPT

        spec = self.spec
        rank, world = fabric.global_rank, fabric.world_size
        self.tok_digest = tokenizer_digest(inputs.ckpt_dir)
        train_sampler = open_sampler(
            inputs.dataset_dir,
            spec.mixture,
            spec.seq_len,
            seed=spec.seed,
            stage=spec.name,
            long_context=spec.long_context,
        )
        val_sets: dict[str, np.ndarray] = {}
        if spec.eval_sequences > 0:
            for lang in inputs.languages:
                seqs = load_validation(inputs.dataset_dir, lang, spec.seq_len, spec.eval_sequences)
                if len(seqs) == 0:
                    fabric.print(
                        f"no validation sequence of {spec.seq_len + 1} tokens for {lang}: not evaluated"
                    )
                    continue
                val_sets[lang] = seqs
        first = np.asarray(train_sampler.sequence(0))
        if first.shape != (spec.seq_len + 1,):
            raise VinaSmolError(f"sampler returned shape {first.shape}, expected ({spec.seq_len + 1},)")
        if int(first.max()) >= inputs.config.vocab_size:
            raise ConfigError(
                f"the dataset holds token id {int(first.max())} but the model has "
                f"{inputs.config.vocab_size} tokens"
            )
        fb_digest = first_batch_digest(train_sampler, spec.global_batch)

        # model: the initial weights, tied, policy applied
        init_sd = P.load_lit_state_dict(inputs.ckpt_dir / "lit_model.pth")
        fabric.seed_everything(spec.seed)
        # FSDP's empty init builds on the meta device (load_state_dict would then be a no-op)
        with fabric.init_module(empty_init=not D.is_fsdp(fabric)):
            model = GPT(inputs.config)
        model.load_state_dict(init_sd, strict=True)
        P.tie_embeddings(model)
        model.max_seq_length = spec.seq_len
        trainable = P.apply_policy(model, spec.trainable, inputs.base_vocab_size)
        self.trainable = set(trainable)

        resume = None
        if rank == 0:
            resume = find_resume(store, self.prefix, self.resume_key)
        resume = fabric.broadcast(resume, src=0)
        state_dir: Path | None = None
        if resume is not None:
            with local_rank_zero_first(fabric):
                state_dir = Path(store.fetch(resume[1]))
            P.load_module_state(model, S.load_model_state(state_dir))

        if spec.activation_checkpointing and spec.strategy != "fsdp":
            enable_activation_checkpointing(model)
        raw_model = model
        if spec.compile:
            model = torch.compile(model)
        model = fabric.setup_module(model)
        optimizer, opt_names = make_optimizer(raw_model, spec, fabric.device.type)
        optimizer = fabric.setup_optimizers(optimizer)
        raw_opt = getattr(optimizer, "optimizer", optimizer)

        metrics_path = self.work / "metrics.jsonl"
        start_step = 0
        if state_dir is not None:
            st = S.read_state_json(state_dir)
            start_step = int(st["step"])
            D.load_full_optimizer_state(
                fabric, model, raw_opt, opt_names, S.load_file(str(state_dir / "optimizer.safetensors"))
            )
            rng_path = state_dir / f"rng-rank{rank}.safetensors"
            if int(st.get("world_size", -1)) == world and rng_path.exists():
                S.restore_rng_state(rng_path.read_bytes(), S.read_safetensors_metadata(rng_path))
            if rank == 0 and (state_dir / "metrics.jsonl").exists():
                shutil.copyfile(state_dir / "metrics.jsonl", metrics_path)
                # the train-state's own checkpoint event was emitted after its metrics were copied
                event = {"event": "checkpoint", "stage": spec.name, "step": start_step, "digest": resume[1]}
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event, sort_keys=True) + "\n")
        sink = MetricsSink(metrics_path, self.metrics_copy, enabled=rank == 0)
        self.sink = sink
        total = spec.total_steps
        n_trainable = sum(p.numel() for p in P.named_parameters(raw_model).values() if p.requires_grad)
        sink.emit(
            {
                "event": "start",
                "stage": spec.name,
                "total_steps": total,
                "start_step": start_step,
                "resumed_from": resume[0] if resume else None,
                "trainable": trainable,
                "trainable_params": n_trainable,
                "world_size": world,
                "first_batch_sha256": fb_digest,
            }
        )
        self.byte_lengths = token_byte_lengths(inputs.ckpt_dir, inputs.config.padded_vocab_size)
        if start_step == 0 and spec.eval_at_start and val_sets:
            self._evaluate(model, val_sets, 0)

        # ------------------------------------------------------------------ loop
        accum = spec.grad_accum
        vocab = inputs.config.vocab_size  # padded rows never enter the loss
        last_loss = float("nan")
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = learning_rate(
                step,
                lr=spec.lr,
                min_lr=spec.min_lr,
                warmup_steps=spec.warmup_steps,
                total_steps=total,
                schedule=spec.schedule,
                decay_fraction=spec.decay_fraction,
            )
            for group in raw_opt.param_groups:
                group["lr"] = lr
            batches = (
                torch.from_numpy(
                    _sequences(
                        train_sampler,
                        batch_indices(
                            step,
                            micro,
                            global_batch=spec.global_batch,
                            micro_batch=spec.micro_batch,
                            rank=rank,
                            world=world,
                        ),
                    )
                )
                for micro in range(accum)
            )
            step_loss, grad_norm = optimizer_step(
                fabric, model, optimizer, batches, accum, vocab, spec.grad_clip
            )
            last_loss = float(step_loss)
            done = step + 1
            dt = time.perf_counter() - t0
            if done % spec.log_interval == 0 or done == total:
                sink.emit(
                    {
                        "event": "step",
                        "stage": spec.name,
                        "step": done,
                        "total_steps": total,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": done * spec.tokens_per_step,
                        "tokens_per_s": spec.tokens_per_step / dt,
                        "step_time_s": dt,
                    }
                )
            if val_sets and (done % spec.eval_interval == 0 or done == total):
                self._evaluate(model, val_sets, done)
            if done % spec.checkpoint_interval == 0 or done == total:
                self._publish_state(model, raw_model, raw_opt, opt_names, done, last_loss)
            if self.job.fail_at_step is not None and done == self.job.fail_at_step:
                fabric.print(f"fail_at_step={done}: killing this process", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        fabric.barrier()
        final_state = D.full_module_state(fabric, model, raw_model)
        result = None
        if rank == 0:
            result = self._publish_final(final_state, init_sd, total, fb_digest, resume)
        fabric.barrier()
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, model: Any, val_sets: dict[str, np.ndarray], step: int) -> None:
        fabric, spec = self.fabric, self.spec
        rank, world = fabric.global_rank, fabric.world_size
        vocab = self.inputs.config.vocab_size
        lengths = torch.from_numpy(self.byte_lengths)
        losses: dict[str, float] = {}
        bpb: dict[str, float] = {}
        for lang, seqs in val_sets.items():
            mine = list(range(rank, len(seqs), world))
            totals = torch.zeros(3, dtype=torch.float64)  # nll (nats), tokens, bytes
            for start in range(0, len(mine), spec.micro_batch):
                batch = torch.from_numpy(seqs[mine[start : start + spec.micro_batch]])
                x, y = batch[:, :-1].to(fabric.device), batch[:, 1:]
                logits = model(x)[..., :vocab].float().reshape(-1, vocab)
                nll = F.cross_entropy(logits, y.reshape(-1).to(fabric.device), reduction="sum")
                totals += torch.tensor([float(nll), y.numel(), float(lengths[y].sum())], dtype=torch.float64)
            totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
            if totals[1] > 0:
                losses[lang] = float(totals[0] / totals[1])
                bpb[lang] = float(totals[0] / (math.log(2) * max(float(totals[2]), 1.0)))
        self.sink.emit(
            {"event": "eval", "stage": spec.name, "step": step, "val_loss": losses, "val_bpb": bpb}
        )

    # ------------------------------------------------------------------ checkpoints
    def _publish_state(
        self, model: Any, raw_model: Any, optimizer: Any, names: dict[int, str], step: int, loss: float
    ) -> None:
        fabric, spec = self.fabric, self.spec
        blobs = _gather_bytes(fabric, S.rng_state_bytes())
        module_state = D.full_module_state(fabric, model, raw_model)
        optim_state = D.full_optimizer_state(fabric, model, optimizer, names)
        if fabric.global_rank == 0:
            out = self.work / f"state-{step:08d}"
            out.mkdir()
            S.save_model_state(out, module_state, self.trainable)
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in optim_state.items()},
                str(out / "optimizer.safetensors"),
            )
            for r, blob in enumerate(blobs):
                (out / f"rng-rank{r}.safetensors").write_bytes(blob)
            S.write_state_json(
                out,
                {
                    "step": step,
                    "data_position": step * spec.global_batch,
                    "tokens": step * spec.tokens_per_step,
                    "world_size": fabric.world_size,
                    "resume_key": self.resume_key,
                    "stage": spec.name,
                },
            )
            if self.sink.path.exists():
                shutil.copyfile(self.sink.path, out / "metrics.jsonl")
            manifest = CheckpointManifest(
                name=f"{spec.name}-step-{step}",
                format="train-state",
                model_config=asdict(self.inputs.config),
                stage=spec.name,
                step=step,
                tokenizer_digest=self.tok_digest,
                metrics={"loss": loss},
                parents=[self.inputs.init_digest, self.inputs.dataset_digest],
                extra={
                    "resume_key": self.resume_key,
                    "data_position": step * spec.global_batch,
                    "world_size": fabric.world_size,
                    "spec": spec.model_dump(mode="json"),
                },
            )
            published = self.store.publish(manifest, out, ref=f"{self.prefix}/step-{step:08d}")
            shutil.rmtree(out, ignore_errors=True)
            self._prune_states(step)
            self.sink.emit(
                {
                    "event": "checkpoint",
                    "stage": spec.name,
                    "step": step,
                    "digest": published.digest,
                    "ref": f"{self.prefix}/step-{step:08d}",
                }
            )
        fabric.barrier()

    def _prune_states(self, newest: int) -> None:
        """Drop the refs of train-states older than the newest `keep_checkpoints`, and their manifests
        (the store's garbage collection then reclaims their blobs)."""
        keep = self.spec.keep_checkpoints
        delete = getattr(self.store, "delete_ref", None)
        if keep is None or delete is None:
            return
        steps = sorted(
            (int(m.group(1)), ref)
            for ref in self.store.list_refs(self.prefix + "/")
            if (m := STEP_REF.search(ref)) and int(m.group(1)) <= newest
        )
        for _, ref in steps[:-keep]:
            delete(ref, prune_manifest=True)

    def _publish_final(
        self,
        state: dict[str, torch.Tensor],
        init_sd: dict[str, torch.Tensor],
        total: int,
        fb_digest: str,
        resume: tuple[int, str] | None,
    ) -> CheckpointManifest:
        from litgpt.utils import save_config

        spec, inputs = self.spec, self.inputs
        out_sd: dict[str, torch.Tensor] = {}
        for name, init in init_sd.items():
            if name == P.HEAD:
                continue
            cur = state[name]
            if name == P.EMBED and P.NEW_ROWS in state:
                cur = torch.cat([cur[: inputs.base_vocab_size], state[P.NEW_ROWS].to(cur.dtype)])
                merged = init.clone()
                merged[inputs.base_vocab_size :] = cur[inputs.base_vocab_size :].to(init.dtype)
                frozen_now = cur[: inputs.base_vocab_size]
                if frozen_now.dtype == init.dtype and not torch.equal(
                    frozen_now, init[: inputs.base_vocab_size]
                ):
                    raise VinaSmolError("internal error: frozen embedding rows changed during training")
                out_sd[name] = merged
            elif name in self.trainable:
                out_sd[name] = cur.detach().to("cpu", init.dtype).clone()
            else:
                if cur.dtype == init.dtype and not torch.equal(cur.cpu(), init):
                    raise VinaSmolError(f"internal error: frozen tensor {name} changed during training")
                out_sd[name] = init
        out_sd[P.HEAD] = out_sd[P.EMBED]
        out = self.work / "final"
        out.mkdir()
        torch.save(out_sd, out / "lit_model.pth")
        save_config(inputs.config, out)
        for fname in TOKENIZER_FILES:
            if (inputs.ckpt_dir / fname).exists():
                shutil.copyfile(inputs.ckpt_dir / fname, out / fname)
        events = read_events(self.sink.path)
        self.sink.emit({"event": "done", "stage": spec.name, "step": total})
        shutil.copyfile(self.sink.path, out / "metrics.jsonl")
        plot_loss_curve(read_events(self.sink.path), out / "loss_curve.svg", f"{spec.name}: loss")
        evals = [e for e in events if e.get("event") == "eval"]
        steps = [e for e in events if e.get("event") == "step"]
        summary: dict[str, Any] = {"tokens": total * spec.tokens_per_step, "steps": total}
        if steps:
            summary["final_loss"] = steps[-1]["loss"]
            tps = [e["tokens_per_s"] for e in steps[1:]] or [steps[0]["tokens_per_s"]]
            summary["tokens_per_s"] = float(np.median(tps))
        if evals:
            summary["val_loss"] = evals[-1]["val_loss"]
            summary["val_bpb"] = evals[-1]["val_bpb"]
            summary["val_bpb_start"] = evals[0]["val_bpb"]
        (out / "stage.json").write_text(
            json.dumps(
                {"spec": spec.model_dump(mode="json"), "summary": summary, "first_batch_sha256": fb_digest},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        extra: dict[str, Any] = {
            "spec": spec.model_dump(mode="json"),
            "first_batch_sha256": fb_digest,
            "resume_key": self.resume_key,
            "trainable": sorted(self.trainable),
            "resumed_from_step": resume[0] if resume else None,
        }
        if inputs.base_vocab_size is not None:
            extra["base_vocab_size"] = inputs.base_vocab_size
        manifest = CheckpointManifest(
            name=spec.name,
            format="litgpt",
            model_config=asdict(inputs.config),
            stage=spec.name,
            step=total,
            tokenizer_digest=self.tok_digest,
            metrics=summary,
            parents=[inputs.init_digest, inputs.dataset_digest],
            extra=extra,
        )
        published = self.store.publish(manifest, out, ref=self.out_ref)
        print(RESULT_PREFIX + json.dumps({"digest": published.digest, "ref": self.out_ref}), flush=True)
        return published


def run_stage(
    job: StageJob, metrics_copy: Path | None = None, store: Any | None = None
) -> CheckpointManifest | None:
    """Run one stage in this process (one rank). Returns the published manifest on rank 0.

    `store` overrides ArtifactStore(job.store_url) (an in-process store, e.g. memory://)."""
    return StageRunner(job, metrics_copy, store).run()
