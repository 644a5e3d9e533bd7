"""A stage's checkpoints in the store: train-states to resume from (find, restore, publish, prune)
and the final plain litgpt checkpoint.

A train-state is published under `<partial prefix>/step-<step>`; only those made by the same stage
(the same resume key) are resumed from. The final checkpoint holds every tensor as a plain state
dict (frozen tensors as they came in, bit for bit), the tokenizer, metrics and a loss curve.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.common.memory import training_process_peaks
from vinasmol_core.train import dist, params, relora, state
from vinasmol_core.train.data import TOKENIZER_FILES, tokenizer_digest
from vinasmol_core.train.inputs import Inputs
from vinasmol_core.train.metrics import MEMORY_KEYS, RESULT_PREFIX, MetricsSink, plot_loss_curve, read_events
from vinasmol_core.train.runtime import gather_bytes, local_rank_zero_first
from vinasmol_core.train.spec import StageJob

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from vinasmol_core.store import ArtifactStore

STEP_REF = re.compile(r"step-(\d+)$")


def find_resume(store: ArtifactStore, prefix: str, resume_key: str) -> tuple[int, str] | None:
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


def final_state_dict(
    current: dict[str, torch.Tensor],
    init_sd: dict[str, torch.Tensor],
    trainable: set[str],
    base_vocab_size: int | None,
) -> dict[str, torch.Tensor]:
    """The plain litgpt state dict after training: trained tensors (new embedding rows written back
    into the tied table), frozen ones exactly as they came in (checked), the head tied to the table."""
    out: dict[str, torch.Tensor] = {}
    for name, init in init_sd.items():
        if name == params.HEAD:
            continue
        cur = current[name]
        if name == params.EMBED and params.NEW_ROWS in current:
            cur = torch.cat([cur[:base_vocab_size], current[params.NEW_ROWS].to(cur.dtype)])
            merged = init.clone()
            merged[base_vocab_size:] = cur[base_vocab_size:].to(init.dtype)
            frozen_now = cur[:base_vocab_size]
            if frozen_now.dtype == init.dtype and not torch.equal(frozen_now, init[:base_vocab_size]):
                raise VinaSmolError("internal error: frozen embedding rows changed during training")
            out[name] = merged
        elif name in trainable:
            out[name] = cur.detach().to("cpu", init.dtype).clone()
        else:
            if cur.dtype == init.dtype and not torch.equal(cur.cpu(), init):
                raise VinaSmolError(f"internal error: frozen tensor {name} changed during training")
            out[name] = init
    out[params.HEAD] = out[params.EMBED]
    return out


def stage_summary(events: list[dict[str, Any]], tokens: int, steps: int) -> dict[str, Any]:
    """Final loss, median throughput (first step left out), the first and last evaluations, the
    trainable parameters and optimizer-state bytes (as trained and at full rank), ReLoRA's merges."""
    evals = [e for e in events if e.get("event") == "eval"]
    step_events = [e for e in events if e.get("event") == "step"]
    summary: dict[str, Any] = {"tokens": tokens, "steps": steps}
    starts = [e for e in events if e.get("event") == "start"]
    if starts:
        summary.update({k: starts[-1][k] for k in MEMORY_KEYS if k in starts[-1]})
        summary["relora_merges"] = sum(1 for e in events if e.get("event") == "merge")
    if step_events:
        summary["final_loss"] = step_events[-1]["loss"]
        tps = [e["tokens_per_s"] for e in step_events[1:]] or [step_events[0]["tokens_per_s"]]
        summary["tokens_per_s"] = float(np.median(tps))
    if evals:
        summary["val_loss"] = evals[-1]["val_loss"]
        summary["val_bpb"] = evals[-1]["val_bpb"]
        summary["val_bpb_start"] = evals[0]["val_bpb"]
    return summary


class Checkpointer:
    """Train-states and the final checkpoint of one stage, on one rank (rank 0 writes)."""

    def __init__(
        self,
        fabric: Fabric,
        store: ArtifactStore,
        job: StageJob,
        inputs: Inputs,
        sink: MetricsSink,
        work: Path,
        trainable: list[str],
    ) -> None:
        self.fabric = fabric
        self.store = store
        self.spec = job.spec
        self.inputs = inputs
        self.sink = sink
        self.work = work
        self.trainable = set(trainable)
        self.resume_key = job.resume_key(inputs.init_digest, inputs.dataset_digest)
        self.out_ref, self.prefix = job.resolved_refs(inputs.init_digest, inputs.dataset_digest)
        self.tokenizer_digest = tokenizer_digest(inputs.ckpt_dir)

    # ------------------------------------------------------------------ resume
    def find(self) -> tuple[int, str] | None:
        """The newest train-state of this stage (looked up on rank 0, the same on every rank)."""
        found = None
        if self.fabric.global_rank == 0:
            found = find_resume(self.store, self.prefix, self.resume_key)
        return self.fabric.broadcast(found, src=0)

    def fetch(self, digest: str) -> Path:
        with local_rank_zero_first(self.fabric):
            return Path(self.store.fetch(digest))

    def restore_training(
        self,
        state_dir: Path,
        resumed: tuple[int, str],
        module: Any,
        optimizer: torch.optim.Optimizer,
        names: dict[int, str],
    ) -> int:
        """Optimizer, RNG (same world size) and metrics so far from a train-state; returns its step."""
        fabric = self.fabric
        saved = state.read_state_json(state_dir)
        step = int(saved["step"])
        if self.spec.relora is not None:
            expected = relora.cycle_position(step, self.spec.total_steps, self.spec.relora)
            if saved.get("relora") != expected:
                raise VinaSmolError(
                    f"train-state {resumed[1][:12]}: ReLoRA cycle {saved.get('relora')} does not match "
                    f"step {step} ({expected})"
                )
        tensors = state.load_file(str(state_dir / "optimizer.safetensors"))
        dist.load_full_optimizer_state(fabric, module, optimizer, names, tensors)
        rng_path = state_dir / f"rng-rank{fabric.global_rank}.safetensors"
        if int(saved.get("world_size", -1)) == fabric.world_size and rng_path.exists():
            state.restore_rng_state(rng_path.read_bytes(), state.read_safetensors_metadata(rng_path))
        if fabric.global_rank == 0 and (state_dir / "metrics.jsonl").exists():
            shutil.copyfile(state_dir / "metrics.jsonl", self.sink.path)
            # the train-state's own checkpoint event was emitted after its metrics were copied
            event = {"event": "checkpoint", "stage": self.spec.name, "step": step, "digest": resumed[1]}
            with open(self.sink.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, sort_keys=True) + "\n")
        return step

    # ------------------------------------------------------------------ train-states
    def publish_state(
        self, module: Any, raw_module: Any, optimizer: torch.optim.Optimizer, names: dict[int, str],
        step: int, loss: float,
    ) -> None:
        """Gather the full state on rank 0, publish it as a train-state, prune older ones."""
        fabric = self.fabric
        rng_blobs = gather_bytes(fabric, state.rng_state_bytes())
        module_state = dist.full_module_state(fabric, module, raw_module)
        optim_state = dist.full_optimizer_state(fabric, module, optimizer, names)
        if fabric.global_rank == 0:
            out = self.work / f"state-{step:08d}"
            out.mkdir()
            self._write_state(out, module_state, optim_state, rng_blobs, step)
            ref = f"{self.prefix}/step-{step:08d}"
            published = self.store.publish(self._state_manifest(step, loss), out, ref=ref)
            shutil.rmtree(out, ignore_errors=True)
            self.prune(step)
            self.sink.emit(
                {"event": "checkpoint", "stage": self.spec.name, "step": step, "digest": published.digest,
                 "ref": ref}
            )
        fabric.barrier()

    def _write_state(
        self, out: Path, module_state: dict[str, torch.Tensor], optim_state: dict[str, torch.Tensor],
        rng_blobs: list[bytes], step: int,
    ) -> None:
        from safetensors.torch import save_file

        spec = self.spec
        state.save_model_state(out, module_state, self.trainable)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in optim_state.items()},
            str(out / "optimizer.safetensors"),
        )
        for r, blob in enumerate(rng_blobs):
            (out / f"rng-rank{r}.safetensors").write_bytes(blob)
        data: dict[str, Any] = {
            "step": step,
            "data_position": step * spec.global_batch,
            "tokens": step * spec.tokens_per_step,
            "world_size": self.fabric.world_size,
            "resume_key": self.resume_key,
            "stage": spec.name,
        }
        if spec.relora is not None:  # merges done so far and updates into the current cycle
            data["relora"] = relora.cycle_position(step, spec.total_steps, spec.relora)
        state.write_state_json(out, data)
        if self.sink.path.exists():
            shutil.copyfile(self.sink.path, out / "metrics.jsonl")

    def _state_manifest(self, step: int, loss: float) -> CheckpointManifest:
        spec = self.spec
        return CheckpointManifest(
            name=f"{spec.name}-step-{step}",
            format="train-state",
            model_config=asdict(self.inputs.config),
            stage=spec.name,
            step=step,
            tokenizer_digest=self.tokenizer_digest,
            metrics={"loss": loss},
            parents=[self.inputs.init_digest, self.inputs.dataset_digest],
            extra={
                "resume_key": self.resume_key,
                "data_position": step * spec.global_batch,
                "world_size": self.fabric.world_size,
                "spec": spec.model_dump(mode="json"),
            },
        )

    def prune(self, newest: int) -> None:
        """Drop train-states older than the newest `keep_checkpoints`: their refs and, where no other
        ref names them, their manifests, so the store's garbage collection frees their blobs."""
        keep = self.spec.keep_checkpoints
        if keep is None:
            return
        steps = sorted(
            (int(m.group(1)), ref)
            for ref in self.store.list_refs(self.prefix + "/")
            if (m := STEP_REF.search(ref)) and int(m.group(1)) <= newest
        )
        for _, ref in steps[:-keep]:
            self.store.delete_ref(ref, prune_manifest=True)

    # ------------------------------------------------------------------ the final checkpoint
    def publish_final(
        self,
        current: dict[str, torch.Tensor],
        init_sd: dict[str, torch.Tensor],
        first_batch_sha256: str,
        resumed: tuple[int, str] | None,
        mixture: dict[str, dict[str, float]],
        mixture_warnings: list[str],
    ) -> CheckpointManifest:
        """Write and publish the stage's plain litgpt checkpoint (rank 0 only)."""
        spec, inputs = self.spec, self.inputs
        total = spec.total_steps
        out = self.work / "final"
        out.mkdir()
        self._write_final(out, final_state_dict(current, init_sd, self.trainable, inputs.base_vocab_size))
        events = read_events(self.sink.path)
        self.sink.emit({"event": "done", "stage": spec.name, "step": total})
        shutil.copyfile(self.sink.path, out / "metrics.jsonl")
        if self.sink.loggers is not None:  # CSV and TensorBoard logs travel with the checkpoint
            self.sink.loggers.close()
            self.sink.loggers.copy_into(out / "logs")
        plot_loss_curve(read_events(self.sink.path), out / "loss_curve.svg", f"{spec.name}: loss")
        summary = {**stage_summary(events, total * spec.tokens_per_step, total), **training_process_peaks()}
        (out / "stage.json").write_text(
            json.dumps(
                {"spec": spec.model_dump(mode="json"), "summary": summary,
                 "first_batch_sha256": first_batch_sha256},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        extra: dict[str, Any] = {
            "spec": spec.model_dump(mode="json"),
            "first_batch_sha256": first_batch_sha256,
            "resume_key": self.resume_key,
            "trainable": sorted(n for n in self.trainable if not relora.is_adapter(n)),
            "resumed_from_step": resumed[0] if resumed else None,
            "mixture": mixture,
            "mixture_warnings": mixture_warnings,
        }
        if inputs.base_vocab_size is not None:
            extra["base_vocab_size"] = inputs.base_vocab_size
        manifest = CheckpointManifest(
            name=spec.name,
            format="litgpt",
            model_config=asdict(inputs.config),
            stage=spec.name,
            step=total,
            tokenizer_digest=self.tokenizer_digest,
            metrics=summary,
            parents=[inputs.init_digest, inputs.dataset_digest],
            extra=extra,
        )
        published = self.store.publish(manifest, out, ref=self.out_ref)
        print(RESULT_PREFIX + json.dumps({"digest": published.digest, "ref": self.out_ref}), flush=True)
        return published

    def _write_final(self, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
        from litgpt.utils import save_config

        torch.save(state_dict, out / "lit_model.pth")
        save_config(self.inputs.config, out)
        for fname in TOKENIZER_FILES:
            if (self.inputs.ckpt_dir / fname).exists():
                shutil.copyfile(self.inputs.ckpt_dir / fname, out / fname)
