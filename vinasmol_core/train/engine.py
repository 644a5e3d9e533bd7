"""The stage runner: one process (or one rank of a torchrun group) training one stage.

Order of work: validate everything that can be checked without training (spec, checkpoint, dataset,
tokenizer, trainable patterns, sequence length; `inputs`), then resume from the newest train-state
published under the job's partial ref prefix (if any; `checkpoint`), train with Fabric (`runtime`),
publish train-states every `checkpoint_interval` steps and a plain litgpt checkpoint at the end.
A SIGTERM (a pod being evicted) ends the stage after the step in progress, with a train-state of
that step published first, so a re-run resumes from it (`Preempted`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vinasmol_core.common.errors import ConfigError, Preempted, VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.train import dist, microbatch, params, relora, runtime, state
from vinasmol_core.train.checkpoint import Checkpointer
from vinasmol_core.train.data import (
    batch_indices,
    load_validation,
    open_sampler,
    token_byte_lengths,
)
from vinasmol_core.train.group import lose_node
from vinasmol_core.train.hold import HOLD_ENV, HOLD_IN_STEP_ENV, hold_for_a_kill, hold_requested
from vinasmol_core.train.inputs import Inputs, prepare_inputs
from vinasmol_core.train.loggers import StageLoggers, check_logging, log_root
from vinasmol_core.train.metrics import MetricsSink, print_line, read_events
from vinasmol_core.train.schedule import learning_rate
from vinasmol_core.train.spec import StageJob
from vinasmol_core.train.watchdog import StepWatchdog, end_process

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from vinasmol_core.data.sampler import MixtureSampler
    from vinasmol_core.store import ArtifactStore

__all__ = ["StageRunner", "optimizer_step", "run_stage"]

_TERM = threading.Event()  # set by SIGTERM; read after each optimizer step


def _on_sigterm(signum: int, frame: Any) -> None:
    _TERM.set()


def catch_sigterm() -> None:
    """Turn SIGTERM into a stop after the step in progress (main thread of a stage process only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _sequences(sampler: MixtureSampler, indices: list[int]) -> np.ndarray:
    return np.stack([np.asarray(sampler.sequence(i), dtype=np.int64) for i in indices])


def first_batch_digest(sampler: MixtureSampler, global_batch: int) -> str:
    h = hashlib.sha256()
    for i in range(global_batch):
        h.update(np.ascontiguousarray(np.asarray(sampler.sequence(i), dtype=np.int64)).tobytes())
    return h.hexdigest()


def gradient_norm(fabric: Fabric, model: Any, optimizer: Any, grad_clip: float | None) -> torch.Tensor:
    """The gradients' total norm, clipped to `grad_clip` when set. Without clipping only the norm is
    computed (no pass multiplying every gradient by 1.0); FSDP's sharded norm always goes through
    Fabric."""
    if grad_clip is not None or dist.is_fsdp(fabric):
        max_norm = grad_clip if grad_clip is not None else math.inf  # inf: gradients times exactly 1.0
        return dist.full(fabric.clip_gradients(model, optimizer, max_norm=max_norm))
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


class _HiddenStates(torch.nn.Module):
    """Stands in for `lm_head` while a chunked loss runs: the model returns its final hidden states."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def hidden_states(raw: Any) -> Iterator[Any]:
    """Within the block the bare GPT `raw` returns hidden states instead of logits; yields its head."""
    head = raw.lm_head
    raw.lm_head = _HiddenStates()
    try:
        yield head
    finally:
        raw.lm_head = head


def _chunk_nll(head: Any, h: torch.Tensor, y: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = head(h)[..., :vocab].float()
    return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum")


def chunked_nll(head: Any, h: torch.Tensor, y: torch.Tensor, vocab: int, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of `head(h)` against `y`, `chunk` positions at a time. With gradients each
    chunk's logits are recomputed in the backward pass (activation checkpointing), so no more than
    one chunk's fp32 logits exists at any time."""
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for hs, ys in zip(h.split(chunk, dim=1), y.split(chunk, dim=1), strict=True):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll, head, hs, ys, vocab, use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_nll(head, hs, ys, vocab)
    return total


def lm_loss(
    fabric: Fabric, model: Any, raw: Any | None, x: torch.Tensor, y: torch.Tensor, vocab: int,
    loss_chunk: int = 0, reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy of the wrapped `model` on `x` against `y` (padded rows above `vocab`
    never enter it). `loss_chunk` > 0 with the bare module `raw`: the lm_head and the loss run over
    `loss_chunk` positions at a time (`chunked_nll`), so the full logits are never materialised;
    under FSDP (the head's parameters are only whole inside the root's forward) always in one piece."""
    if loss_chunk > 0 and raw is not None and not dist.is_fsdp(fabric):
        with hidden_states(raw) as head:
            h = model(x)
        with fabric.autocast():
            total = chunked_nll(head, h, y, vocab, loss_chunk)
    else:
        logits = model(x)[..., :vocab].float()
        total = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum")
    return total / y.numel() if reduction == "mean" else total


def optimizer_step(
    fabric: Fabric,
    model: Any,
    optimizer: Any,
    batches: Iterator[torch.Tensor],
    accum: int,
    vocab: int,
    grad_clip: float | None,
    raw: Any | None = None,
    loss_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update over `accum` micro-batches of (seq_len + 1)-token rows (`lm_loss`: chunked
    with `loss_chunk` > 0 and the bare module `raw`).

    Returns (mean loss over all ranks, gradient norm before clipping)."""
    loss_sum = torch.zeros((), device=fabric.device)
    for micro, batch in enumerate(batches):
        batch = batch.to(fabric.device)
        x, y = batch[:, :-1], batch[:, 1:]
        with fabric.no_backward_sync(model, enabled=micro < accum - 1):
            loss = lm_loss(fabric, model, raw, x, y, vocab, loss_chunk)
            fabric.backward(loss / accum)
        loss_sum += loss.detach()
    grad_norm = gradient_norm(fabric, model, optimizer, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return fabric.all_reduce(loss_sum / accum, reduce_op="mean"), grad_norm


@dataclass
class StageData:
    """The stage's data: the training sampler and the validation sequences per language."""

    sampler: MixtureSampler
    val_sets: dict[str, np.ndarray]
    first_batch_sha256: str
    mixture: dict[str, dict[str, float]]  # per source: requested and effective share
    warnings: list[str]


@dataclass
class StageModel:
    """The model as trained: wrapped and bare module, optimizer, and what it came from."""

    module: Any  # the Fabric-wrapped (maybe compiled) GPT
    raw: Any  # the bare GPT
    optimizer: Any  # the Fabric-wrapped optimizer
    raw_optimizer: torch.optim.Optimizer
    names: dict[int, str]  # id(parameter) -> canonical name
    trainable: list[str]  # what the stage changes (with ReLoRA: the targeted base weights and adapters)
    init_state: dict[str, torch.Tensor]
    adapters: list[torch.Tensor]  # ReLoRA's adapter parameters (empty without ReLoRA)


class StageRunner:
    """Runs one stage inside a launched Fabric (one instance per rank)."""

    def __init__(
        self,
        job: StageJob,
        fabric: Fabric,
        store: ArtifactStore,
        inputs: Inputs,
        work: Path,
        metrics_copy: Path | None = None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.job = job
        self.in_process = announce is not None
        self.spec = job.spec
        self.fabric = fabric
        self.store = store
        self.inputs = inputs
        self.work = work
        rank0 = fabric.global_rank == 0
        self.sink = MetricsSink(work / "metrics.jsonl", metrics_copy, rank0, announce=announce or print_line)
        self.byte_lengths = torch.from_numpy(
            token_byte_lengths(inputs.ckpt_dir, inputs.config.padded_vocab_size)
        )
        self.watchdog: StepWatchdog | None = None  # armed in a stage process, never in the caller's

    def _mark(self, phase: str, step: int) -> None:
        """What this rank is doing, for the step watchdog's message."""
        if self.watchdog is not None:
            self.watchdog.phase(phase, step)

    def run(self) -> CheckpointManifest | None:
        """Train the stage; returns the published final checkpoint on rank 0 (None elsewhere)."""
        spec = self.spec
        if self.fabric.global_rank == 0:
            key = self.job.resume_key(self.inputs.init_digest, self.inputs.dataset_digest)
            self.sink.loggers = StageLoggers(self.job, log_root(self.job, self.work, key))
        data = self._open_data()
        model, init_state, trainable = self._load_model()
        checkpoints = Checkpointer(
            self.fabric, self.store, self.job, self.inputs, self.sink, self.work, trainable
        )
        resumed = checkpoints.find()
        state_dir = checkpoints.fetch(resumed[1]) if resumed is not None else None
        if state_dir is not None:
            params.load_module_state(model, state.load_model_state(state_dir))
        m = self._setup(model, init_state, trainable)
        start_step = 0
        if state_dir is not None and resumed is not None:
            start_step = checkpoints.restore_training(state_dir, resumed, m.module, m.raw_optimizer, m.names)
        self._emit_start(data, m, start_step, resumed)
        if start_step > 0:  # the restored metrics.jsonl: curves and logs show the steps before the resume
            self.sink.replay(read_events(self.sink.path))
        if start_step == 0 and spec.eval_at_start and data.val_sets:
            self._evaluate(m.module, data.val_sets, 0, m.raw)
        try:
            self._train(data, m, checkpoints, start_step)
        except BaseException:
            checkpoints.abandon()  # the upload in flight ends (published whole or not at all) first
            raise
        if spec.micro_batch_search is not None:
            self._search_micro_batch(m)
        if spec.relora is not None:
            relora.merge(m.raw)  # the final checkpoint is a plain litgpt one: adapters folded in
        self.fabric.barrier()
        final_state = dist.full_module_state(self.fabric, m.module, m.raw)
        result = None
        if self.fabric.global_rank == 0:
            result = checkpoints.publish_final(
                final_state, m.init_state, data.first_batch_sha256, resumed, data.mixture, data.warnings
            )
        self.fabric.barrier()
        return result

    # ------------------------------------------------------------------ phases
    def _open_data(self) -> StageData:
        spec, inputs, fabric = self.spec, self.inputs, self.fabric
        sampler = open_sampler(
            inputs.dataset_dir, spec.mixture, spec.seq_len, seed=spec.seed, stage=spec.name,
            long_context=spec.long_context,
        )
        warnings = sampler.mixture_warnings()
        for warning in warnings:
            fabric.print(f"warning: stage {spec.name}: {warning}", flush=True)
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
        first = np.asarray(sampler.sequence(0))
        if first.shape != (spec.seq_len + 1,):
            raise VinaSmolError(f"sampler returned shape {first.shape}, expected ({spec.seq_len + 1},)")
        if int(first.max()) >= inputs.config.vocab_size:
            raise ConfigError(
                f"the dataset holds token id {int(first.max())} but the model has "
                f"{inputs.config.vocab_size} tokens"
            )
        return StageData(
            sampler, val_sets, first_batch_digest(sampler, spec.global_batch),
            sampler.effective_mixture(), warnings,
        )

    def _load_model(self) -> tuple[Any, dict[str, torch.Tensor], list[str]]:
        """The initial weights in litgpt's GPT, tied, the trainable policy applied."""
        from litgpt.model import GPT

        spec, inputs, fabric = self.spec, self.inputs, self.fabric
        init_state = params.load_lit_state_dict(inputs.ckpt_dir / "lit_model.pth")
        fabric.seed_everything(spec.seed)
        # FSDP's empty init builds on the meta device (load_state_dict would then be a no-op)
        with fabric.init_module(empty_init=not dist.is_fsdp(fabric)):
            model = GPT(inputs.config)
        model.load_state_dict(init_state, strict=True)
        params.tie_embeddings(model)
        model.max_seq_length = spec.seq_len
        trainable = params.apply_policy(model, spec.trainable, inputs.base_vocab_size)
        if spec.relora is not None:
            trainable = trainable + relora.attach(model, spec.relora, spec.seed)
        return model, init_state, trainable

    def _setup(self, model: Any, init_state: dict[str, torch.Tensor], trainable: list[str]) -> StageModel:
        """Activation checkpointing, compile, Fabric wrapping and the optimizer."""
        spec, fabric = self.spec, self.fabric
        if spec.activation_checkpointing:
            runtime.enable_activation_checkpointing(model)
        raw = model
        if runtime.compile_enabled(spec, fabric.device.type):
            model = torch.compile(model)
        module = fabric.setup_module(model)
        optimizer, names = runtime.make_optimizer(raw, spec)
        wrapped = fabric.setup_optimizers(optimizer)
        raw_optimizer = getattr(wrapped, "optimizer", wrapped)
        adapters = [p for n, p in params.named_parameters(raw).items() if relora.is_adapter(n)]
        return StageModel(module, raw, wrapped, raw_optimizer, names, trainable, init_state, adapters)

    def memory(self, m: StageModel) -> dict[str, int]:
        """Trainable parameters and AdamW state bytes as trained, and for the same stage at full rank
        (every tensor the stage changes in the optimizer): equal without ReLoRA."""
        named = params.named_parameters(m.raw)
        live = [p for p in named.values() if p.requires_grad]
        full = [named[n] for n in m.trainable if not relora.is_adapter(n)]
        return {
            "trainable_params": sum(p.numel() for p in live),
            "optimizer_state_bytes": relora.optimizer_bytes(live),
            "full_rank_trainable_params": sum(p.numel() for p in full),
            "full_rank_optimizer_state_bytes": relora.optimizer_bytes(full),
        }

    def _emit_start(
        self, data: StageData, m: StageModel, start_step: int, resumed: tuple[int, str] | None
    ) -> None:
        self.sink.emit(
            {
                "event": "start",
                "stage": self.spec.name,
                "total_steps": self.spec.total_steps,
                "start_step": start_step,
                "resumed_from": resumed[0] if resumed else None,
                "trainable": [n for n in m.trainable if not relora.is_adapter(n)],
                **self.memory(m),
                "relora": self.spec.relora is not None,
                "world_size": self.fabric.world_size,
                "strategy": dist.strategy_name(self.fabric),
                "first_batch_sha256": data.first_batch_sha256,
                "mixture": data.mixture,
                "warnings": data.warnings,
                "log_dir": str(self.sink.loggers.root) if self.sink.loggers is not None else None,
            }
        )

    def _batches(self, sampler: MixtureSampler, step: int) -> Iterator[torch.Tensor]:
        spec, fabric = self.spec, self.fabric
        rank = fabric.global_rank
        for micro in range(spec.grad_accum):
            self._mark(f"reading micro-batch {micro}", step + 1)
            if micro == 0:
                hold_for_a_kill(f"{spec.name}/rank{rank}", step + 1, HOLD_IN_STEP_ENV)
            indices = batch_indices(
                step, micro, global_batch=spec.global_batch, micro_batch=spec.micro_batch,
                rank=rank, world=fabric.world_size,
            )
            batch = torch.from_numpy(_sequences(sampler, indices))
            self._mark(f"the forward and backward pass of micro-batch {micro}", step + 1)
            yield batch
        self._mark("the gradient norm and the optimizer update", step + 1)

    def _train(self, data: StageData, m: StageModel, checkpoints: Checkpointer, start_step: int) -> None:
        """The optimizer steps from `start_step` on, with logging, evaluation and train-states; in a
        stage process under the step watchdog."""
        if not self.in_process:
            self.watchdog = StepWatchdog(
                self.spec.name, self.fabric.global_rank, self.spec.total_steps, self.spec.step_timeout,
                end_process,
            )
            self.watchdog.start(start_step)
        try:
            self._steps(data, m, checkpoints, start_step)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()

    def _steps(self, data: StageData, m: StageModel, checkpoints: Checkpointer, start_step: int) -> None:
        spec = self.spec
        total = spec.total_steps
        vocab = self.inputs.config.vocab_size  # padded rows never enter the loss
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = learning_rate(
                step, lr=spec.lr, min_lr=spec.min_lr, warmup_steps=spec.warmup_steps, total_steps=total,
                schedule=spec.schedule, decay_fraction=spec.decay_fraction,
            )
            # the jagged restart is for the adapters, whose moments a merge pruned; tensors trained
            # directly (embeddings, norms) keep the stage's schedule
            adapter_lr = lr * relora.restart_factor(step, spec.relora) if spec.relora is not None else lr
            for group in m.raw_optimizer.param_groups:
                group["lr"] = adapter_lr if group.get("relora") else lr
            step_loss, grad_norm = optimizer_step(
                self.fabric, m.module, m.optimizer, self._batches(data.sampler, step), spec.grad_accum,
                vocab, spec.grad_clip, raw=m.raw, loss_chunk=spec.loss_chunk,
            )
            loss = float(step_loss)
            done, dt = step + 1, time.perf_counter() - t0
            if self.watchdog is not None:
                self.watchdog.completed(done, dt)
            if done % spec.log_interval == 0 or done == total:
                self.sink.emit(
                    {
                        "event": "step", "stage": spec.name, "step": done, "total_steps": total,
                        "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                        **({"adapter_lr": adapter_lr} if spec.relora is not None else {}),
                        "tokens": done * spec.tokens_per_step, "tokens_per_s": spec.tokens_per_step / dt,
                        "step_time_s": dt,
                    }
                )
            if spec.relora is not None and done % spec.relora.merge_every == 0 and done < total:
                self._merge(m, done)
            if data.val_sets and (done % spec.eval_interval == 0 or done == total):
                self._mark("the evaluation after its update", done)
                self._evaluate(m.module, data.val_sets, done, m.raw)
            checkpoints.poll()
            saved = done % spec.checkpoint_interval == 0 or done == total
            if saved:
                self._mark("the train-state after its update", done)
                checkpoints.publish_state(m.module, m.raw, m.raw_optimizer, m.names, done, loss)
            if self.job.fail_at_step == done or hold_requested(HOLD_ENV, spec.name, done) is not None:
                checkpoints.settle()  # a kill after this step finds its train-state in the store
            hold_for_a_kill(spec.name, done)
            if self.job.fail_at_step is not None and done == self.job.fail_at_step:
                if self.in_process:  # the caller's process must live on: fail as a killed stage would
                    raise VinaSmolError(f"stage {spec.name}: fail_at_step={done}: stopped as if killed")
                lose_node(spec.nodes, done)
            if done < total and self._term_requested():
                if not saved:
                    checkpoints.publish_state(m.module, m.raw, m.raw_optimizer, m.names, done, loss)
                checkpoints.settle()
                self.sink.emit({"event": "preempted", "stage": spec.name, "step": done})
                raise Preempted(
                    f"stage {spec.name}: stopped by SIGTERM after step {done} of {total}; its train-state "
                    f"is in the store and a re-run resumes from step {done}"
                )
        checkpoints.settle()  # the last train-state is in the store before the final checkpoint

    def _search_micro_batch(self, m: StageModel) -> None:
        """The smoke run's micro-batch search (`microbatch`): one forward and backward pass per
        candidate at the full run's sequence length, gradients discarded, weights untouched."""
        spec, fabric = self.spec, self.fabric
        cfg = spec.micro_batch_search
        assert cfg is not None
        capacity = microbatch.device_capacity(fabric.device)
        skipped = None
        if capacity is None:
            skipped = f"no memory figure for the {fabric.device.type} device (set ${microbatch.MEMORY_ENV})"
        elif fabric.world_size > 1:
            skipped = f"{fabric.world_size} devices: the search runs on a one-device smoke stage"
        elif cfg.seq_len > self.inputs.config.block_size:
            skipped = f"seq_len {cfg.seq_len} is above the model's block_size {self.inputs.config.block_size}"
        if skipped is not None:
            self.sink.emit(
                {"event": "micro_batch_search", "stage": spec.name, "chosen": None, "skipped": skipped}
            )
            return
        assert capacity is not None
        raw, vocab = m.raw, self.inputs.config.vocab_size
        generator = torch.Generator().manual_seed(spec.seed)
        trainable = [p for p in raw.parameters() if p.requires_grad]
        static = microbatch.resident_bytes(
            list(raw.parameters()) + trainable + microbatch.optimizer_state_tensors(m.raw_optimizer)
        )

        def run_pass(micro_batch: int) -> None:
            batch = torch.randint(vocab, (micro_batch, cfg.seq_len + 1), generator=generator)
            batch = batch.to(fabric.device)
            try:
                loss = lm_loss(fabric, m.module, raw, batch[:, :-1], batch[:, 1:], vocab, spec.loss_chunk)
                fabric.backward(loss)
            finally:
                m.optimizer.zero_grad(set_to_none=True)

        def report(trial: microbatch.Trial) -> None:
            peak = f"{trial.peak_bytes / 2**20:,.1f} MiB" if trial.peak_bytes is not None else "out of memory"
            fabric.print(f"stage {spec.name}: micro-batch {trial.micro_batch} at seq_len {cfg.seq_len}: peak "
                         f"{peak} of {capacity / 2**20:,.1f} MiB: {'fits' if trial.fits else 'does not fit'}",
                         flush=True)

        previous = raw.max_seq_length
        raw.max_seq_length = cfg.seq_len
        try:
            chosen, trials = microbatch.search(
                run_pass, cfg.max_micro_batch, fabric.device, capacity, static, report
            )
            timed = microbatch.measure(run_pass, chosen, fabric.device, static)[1] if chosen else None
        finally:
            raw.max_seq_length = previous
        self.sink.emit(microbatch.search_event(spec.name, cfg.seq_len, capacity, chosen, trials, timed))

    def _term_requested(self) -> bool:
        """Whether a SIGTERM reached this rank, or in a group any rank, during the last step: every
        rank stops after the same step, so their train-state is one."""
        flag = torch.tensor([1.0 if _TERM.is_set() else 0.0])
        if self.fabric.world_size > 1:
            flag = self.fabric.all_reduce(flag.to(self.fabric.device), reduce_op="sum").cpu()
        return bool(flag.item() > 0)

    def _merge(self, m: StageModel, done: int) -> None:
        """ReLoRA's restart after update `done`: merge the adapters, draw the next cycle's adapters,
        prune their AdamW moments. Before any train-state of this step, so one holds the new cycle."""
        cfg = self.spec.relora
        assert cfg is not None
        cycle = done // cfg.merge_every
        relora.merge(m.raw)
        relora.init_adapters(m.raw, self.spec.seed, cycle)
        relora.reset_moments(m.raw_optimizer, m.adapters, cfg.optimizer_reset)
        self.sink.emit({"event": "merge", "stage": self.spec.name, "step": done, "cycle": cycle})

    @torch.no_grad()
    def _evaluate(
        self, model: Any, val_sets: dict[str, np.ndarray], step: int, raw: Any | None = None
    ) -> None:
        """Loss and bits per byte per language, summed over ranks."""
        fabric, spec = self.fabric, self.spec
        rank, world = fabric.global_rank, fabric.world_size
        vocab = self.inputs.config.vocab_size
        losses: dict[str, float] = {}
        bpb: dict[str, float] = {}
        model.eval()  # no adapter dropout (and no RNG draw) while evaluating
        for lang, seqs in val_sets.items():
            # every rank makes the same number of forward passes (collectives inside the wrapped
            # module's forward must pair up); a rank short of sequences runs a masked dummy batch
            mine = list(range(rank, len(seqs), world))
            n_forward = math.ceil(math.ceil(len(seqs) / world) / spec.micro_batch)
            totals = torch.zeros(3, dtype=torch.float64)  # nll (nats), tokens, bytes
            for k in range(n_forward):
                chunk = mine[k * spec.micro_batch : (k + 1) * spec.micro_batch]
                batch = torch.from_numpy(seqs[chunk or [0]])
                x, y = batch[:, :-1].to(fabric.device), batch[:, 1:]
                nll = lm_loss(fabric, model, raw, x, y.to(fabric.device), vocab, spec.loss_chunk, "sum")
                if not chunk:
                    continue
                n_bytes = float(self.byte_lengths[y].sum())
                totals += torch.tensor([float(nll), y.numel(), n_bytes], dtype=torch.float64)
            totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
            if totals[1] > 0:
                losses[lang] = float(totals[0] / totals[1])
                bpb[lang] = float(totals[0] / (math.log(2) * max(float(totals[2]), 1.0)))
        model.train()
        self.sink.emit(
            {"event": "eval", "stage": spec.name, "step": step, "val_loss": losses, "val_bpb": bpb}
        )


def run_stage(
    job: StageJob,
    metrics_copy: Path | None = None,
    store: ArtifactStore | None = None,
    announce: Callable[[str], None] | None = None,
) -> CheckpointManifest | None:
    """Run one stage in this process (one rank). Returns the published manifest on rank 0.

    `store` overrides ArtifactStore(job.store_url) (an in-process store, e.g. memory://). `announce`
    takes the metrics lines a stage process prints; given, the stage runs inside a caller that must
    outlive it (`fail_at_step` raises instead of killing the process)."""
    from vinasmol_core.store import ArtifactStore

    spec = job.spec
    spec.check()
    check_logging(job.logging)
    store = store if store is not None else ArtifactStore(job.store_url)
    n_params = None
    if spec.strategy == "auto" and spec.world_size > 1:  # FSDP or DDP by model size
        n_params = runtime.count_params(store.get_manifest(job.init_checkpoint).model_config)
    fabric = runtime.make_fabric(spec, runtime.configure_runtime(spec), n_params)
    fabric.launch()
    with runtime.local_rank_zero_first(fabric):
        inputs = prepare_inputs(job, store)
    work = Path(tempfile.mkdtemp(prefix=f"vinasmol-{spec.name}-"))
    try:
        return StageRunner(job, fabric, store, inputs, work, metrics_copy, announce).run()
    except Exception as exc:
        if not _disk_full(exc):
            raise
        free = shutil.disk_usage(work).free / 1e6
        raise VinaSmolError(
            f"stage {spec.name}: a disk is full ({exc}); its work folder {work} (under $TMPDIR) has "
            f"{free:.1f} MB free. Nothing partial was published: free space (or set TMPDIR to a larger "
            "disk) and run again; the stage resumes from its newest train-state"
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, EDQUOT or EFBIG, as an OSError or inside another library's error (safetensors)."""
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in full:
            return True
        if "No space left on device" in str(exc) or "File too large" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
