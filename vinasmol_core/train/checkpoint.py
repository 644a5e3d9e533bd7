"""A stage's checkpoints in the store: train-states to resume from (find, restore, publish, prune)
and the final plain litgpt checkpoint.

A train-state is published under `<partial prefix>/step-<step>`; only those made by the same stage
(the same resume key) are resumed from. The final checkpoint holds every tensor as a plain state
dict (frozen tensors as they came in, bit for bit), the tokenizer, metrics and a loss curve.

Train-states are written, hashed and uploaded by a background thread while training goes on (at most
one in flight; the step loop pauses only to copy the state into reused host buffers). A process that
dies during an upload leaves nothing of that train-state behind a ref (the store publishes blobs, then
the manifest, then the ref), so a re-run resumes from the newest complete one.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.common.memory import training_process_peaks
from vinasmol_core.train import dist, params, relora, state
from vinasmol_core.train.data import TOKENIZER_FILES, tokenizer_digest
from vinasmol_core.train.hold import HOLD_UPLOAD_ENV, hold_for_a_kill
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
    searches = [e for e in events if e.get("event") == "micro_batch_search"]
    if searches:
        summary["micro_batch_search"] = {k: v for k, v in searches[-1].items() if k not in ("event", "stage")}
    if evals:
        summary["val_loss"] = evals[-1]["val_loss"]
        summary["val_bpb"] = evals[-1]["val_bpb"]
        summary["val_bpb_start"] = evals[0]["val_bpb"]
    return summary


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor shaped like `like`; page-locked when `like` is on CUDA."""
    if like.is_cuda:
        try:
            return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        except RuntimeError:  # no page-locked memory to be had: a plain buffer still works
            pass
    return torch.empty(like.shape, dtype=like.dtype)


@dataclass
class _Upload:
    """A train-state being written and published by a background thread."""

    step: int
    loss: float
    waited_s: float  # what its start waited for the previous upload
    thread: threading.Thread = field(default_factory=threading.Thread)
    stall_s: float = 0.0  # the step loop's time on it: gather, wait, copy to host
    upload_s: float = 0.0
    result: tuple[str, str] | None = None  # (digest, ref)
    error: BaseException | None = None


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
        self._host: dict[str, torch.Tensor] = {}  # reused host copies of the state (background uploads)
        self._upload: _Upload | None = None  # the one train-state in flight

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
        """Gather the full state on rank 0 and publish it as a train-state, then prune older ones.

        With `async_checkpoints` (the default) the step loop only waits for the upload still in flight
        (at most one) and the copy of the state into host buffers; writing, hashing and the upload run
        in a background thread. Otherwise the whole publish happens here."""
        fabric = self.fabric
        t0 = time.perf_counter()
        rng_blobs = gather_bytes(fabric, state.rng_state_bytes())
        module_state = dist.full_module_state(fabric, module, raw_module)
        optim_state = dist.full_optimizer_state(fabric, module, optimizer, names)
        if fabric.global_rank == 0:
            waited = self._finish_upload(waiting_step=step)
            metrics = self.sink.path.read_bytes() if self.sink.path.exists() else None
            if self.spec.async_checkpoints:
                snapshot = self._to_host(module_state, optim_state)
                upload = _Upload(step=step, loss=loss, waited_s=waited)
                upload.thread = threading.Thread(
                    target=self._upload_in_background, args=(upload, *snapshot, rng_blobs, metrics),
                    name=f"train-state-{step}", daemon=True,
                )
                upload.stall_s = time.perf_counter() - t0
                self._upload = upload
                upload.thread.start()
            else:
                t1 = time.perf_counter()
                digest, ref = self._publish_files(step, loss, module_state, optim_state, rng_blobs, metrics)
                now = time.perf_counter()
                self._emit_checkpoint(step, digest, ref, now - t0, now - t1, waited)
        fabric.barrier()

    def poll(self) -> None:
        """Announce the background upload once it has finished (rank 0; never waits)."""
        if self._upload is not None and not self._upload.thread.is_alive():
            self._finish_upload()

    def settle(self) -> None:
        """Every rank returns once the train-state in flight is in the store (the end of a stage, a
        SIGTERM stop, a test's kill): a collective."""
        if self.fabric.global_rank == 0:
            self._finish_upload()
        self.fabric.barrier()

    def abandon(self) -> None:
        """After a failure: let the upload in flight end (the store's publish is atomic: its blobs,
        then its manifest, then its ref) and say what became of it; never raises."""
        upload, self._upload = self._upload, None
        if upload is None:
            return
        upload.thread.join()
        if upload.error is not None:
            print(f"stage {self.spec.name}: the train-state of step {upload.step} was not published: "
                  f"{upload.error}", flush=True)
        elif upload.result is not None:
            try:
                self._emit_checkpoint(upload.step, *upload.result, upload.stall_s, upload.upload_s,
                                      upload.waited_s)
            except Exception as exc:  # noqa: BLE001 - the stage's own error is the one to report
                print(f"stage {self.spec.name}: checkpoint event of step {upload.step} lost: {exc}",
                      flush=True)

    def _finish_upload(self, waiting_step: int | None = None) -> float:
        """Wait for the upload in flight, announce it (or raise its error); the seconds waited."""
        upload, self._upload = self._upload, None
        if upload is None:
            return 0.0
        t0 = time.perf_counter()
        was_running = upload.thread.is_alive()
        upload.thread.join()
        waited = time.perf_counter() - t0
        if upload.error is not None:
            raise upload.error
        assert upload.result is not None
        self._emit_checkpoint(upload.step, *upload.result, upload.stall_s, upload.upload_s, upload.waited_s)
        if was_running and waiting_step is not None:
            print(f"stage {self.spec.name}: the train-state of step {waiting_step} waited {waited:.2f} s "
                  f"for the upload of step {upload.step}", flush=True)
        return waited if was_running else 0.0

    def _upload_in_background(
        self, upload: _Upload, module_state: dict[str, torch.Tensor], optim_state: dict[str, torch.Tensor],
        copied: Any, rng_blobs: list[bytes], metrics: bytes | None,
    ) -> None:
        t0 = time.perf_counter()
        try:
            if copied is not None:  # the device-to-host copies, queued on the training stream
                copied.synchronize()
            upload.result = self._publish_files(
                upload.step, upload.loss, module_state, optim_state, rng_blobs, metrics
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the step loop, raised there
            upload.error = exc
        upload.upload_s = time.perf_counter() - t0

    def _to_host(
        self, module_state: dict[str, torch.Tensor], optim_state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
        """Copies of the state in host buffers kept from one train-state to the next (pinned when the
        state is on CUDA: the copies are queued on the stream, the event returned marks their end)."""
        used: set[str] = set()
        on_cuda = False

        def copy(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            nonlocal on_cuda
            out: dict[str, torch.Tensor] = {}
            for name, value in tensors.items():
                key = prefix + name
                value = value.detach()
                buf = self._host.get(key)
                if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
                    buf = _host_buffer(value)
                    self._host[key] = buf
                buf.copy_(value, non_blocking=value.is_cuda)
                on_cuda = on_cuda or value.is_cuda
                used.add(key)
                out[name] = buf
            return out

        model, optim = copy("model/", module_state), copy("optimizer/", optim_state)
        for key in set(self._host) - used:
            del self._host[key]
        copied = None
        if on_cuda:
            copied = torch.cuda.Event()
            copied.record()
        return model, optim, copied

    def _publish_files(
        self, step: int, loss: float, module_state: dict[str, torch.Tensor],
        optim_state: dict[str, torch.Tensor], rng_blobs: list[bytes], metrics: bytes | None,
    ) -> tuple[str, str]:
        """Write, publish (blobs, manifest, ref) and prune: (digest, ref)."""
        out = self.work / f"state-{step:08d}"
        out.mkdir()
        try:
            self._write_state(out, module_state, optim_state, rng_blobs, step, metrics)
            hold_for_a_kill(self.spec.name, step, HOLD_UPLOAD_ENV)
            ref = f"{self.prefix}/step-{step:08d}"
            published = self.store.publish(self._state_manifest(step, loss), out, ref=ref)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self.prune(step)
        return published.digest, ref

    def _emit_checkpoint(
        self, step: int, digest: str, ref: str, stall_s: float, upload_s: float, waited_s: float
    ) -> None:
        self.sink.emit(
            {"event": "checkpoint", "stage": self.spec.name, "step": step, "digest": digest, "ref": ref,
             "background": self.spec.async_checkpoints, "stall_s": round(stall_s, 4),
             "upload_s": round(upload_s, 4), "waited_s": round(waited_s, 4)}
        )

    def _write_state(
        self, out: Path, module_state: dict[str, torch.Tensor], optim_state: dict[str, torch.Tensor],
        rng_blobs: list[bytes], step: int, metrics: bytes | None,
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
        if metrics is not None:  # the metrics as they were when the state was taken
            (out / "metrics.jsonl").write_bytes(metrics)

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
