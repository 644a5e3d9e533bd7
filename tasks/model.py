"""The bodies of the model steps: typed (Pydantic) requests in, manifests out.

Each function fetches its input artifacts from the store, calls `vinasmol_core.model` in a scratch
folder, publishes the output artifact and returns its manifest. They are plain functions: the
Prefect tasks (cache keys, result storage) are the steps in `tasks.pipeline`, which call them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.common import open_store, scratch_dir
from vinasmol_core.manifests import CheckpointManifest, EvalReportManifest


class StoreRequest(BaseModel):
    """Where artifacts live, and the ref to move to the output (optional)."""

    store_url: str
    out_ref: str | None = None


class FetchBaseRequest(StoreRequest):
    source: str = Field(description="HF folder or hub id")
    name: str = ""


class InitEmbeddingsRequest(StoreRequest):
    base_model: str = Field(description="ref or digest of an hf checkpoint artifact")
    tokenizer: str = Field(description="ref or digest of the extended tokenizer artifact")
    init: Literal["subword-mean", "translation-blend"] = "subword-mean"
    translations: str | None = Field(default=None, description="TSV path, seq2seq folder or hub id")
    blend: float = Field(default=0.5, ge=0.0, le=1.0)


class ConvertRequest(StoreRequest):
    hf_model: str = Field(description="ref or digest of an hf checkpoint artifact")
    litgpt_name: str | None = None
    pad_multiple: int = Field(default=1, ge=1)


class EvaluateRequest(StoreRequest):
    checkpoint: str = Field(description="ref or digest of an hf / litgpt / train-state checkpoint")
    files: dict[str, list[str]] = Field(description="language -> local .jsonl(.gz)/.txt files")
    label: str = ""
    max_docs: int | None = None
    max_bytes: int | None = None
    seq_len: int = 1024
    device: str = "cpu"


class ExportRequest(StoreRequest):
    checkpoint: str = Field(description="ref or digest of a litgpt or train-state checkpoint")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    card: dict[str, Any] = Field(default_factory=dict)


def fetch_base_model(req: FetchBaseRequest) -> CheckpointManifest:
    """Publish the base model (a folder, or a hub download) as an `hf` checkpoint artifact."""
    from vinasmol_core.model import fetch_base_model as fetch
    from vinasmol_core.model import publish_checkpoint

    with scratch_dir("base") as tmp:
        path = fetch(req.source, None if Path(req.source).is_dir() else tmp / "model")
        return publish_checkpoint(
            open_store(req.store_url), path, "hf", ref=req.out_ref, name=req.name or req.source, stage="base"
        )


def init_embeddings(req: InitEmbeddingsRequest) -> CheckpointManifest:
    """Resize the base model to the extended tokenizer and initialise the new rows."""
    from vinasmol_core.model import extend_model, publish_checkpoint

    store = open_store(req.store_url)
    base_dir, tok_dir = store.fetch(req.base_model), store.fetch(req.tokenizer)
    parents = [store.resolve(req.base_model), store.resolve(req.tokenizer)]
    with scratch_dir("embeddings") as tmp:
        out = extend_model(
            base_dir, tok_dir, tmp / "model", init=req.init, translations=req.translations, blend=req.blend
        )
        return publish_checkpoint(
            store, out, "hf", ref=req.out_ref, name="extended", stage="embeddings", parents=parents
        )


def convert_to_litgpt(req: ConvertRequest) -> CheckpointManifest:
    """The HF checkpoint as a litgpt checkpoint (logits parity checked)."""
    from vinasmol_core.model import hf_to_litgpt, publish_checkpoint

    store = open_store(req.store_url)
    hf_dir = store.fetch(req.hf_model)
    with scratch_dir("convert") as tmp:
        out = hf_to_litgpt(hf_dir, tmp / "litgpt", req.litgpt_name, pad_multiple=req.pad_multiple)
        return publish_checkpoint(
            store,
            out,
            "litgpt",
            ref=req.out_ref,
            name="converted",
            stage="convert",
            parents=[store.resolve(req.hf_model)],
        )


def evaluate(req: EvaluateRequest) -> EvalReportManifest:
    """Bits per byte of a checkpoint per language, published as an eval report."""
    from vinasmol_core.model import bits_per_byte_report
    from vinasmol_core.model.bpb import report_to_json

    store = open_store(req.store_url)
    model_dir = store.fetch(req.checkpoint)
    report = bits_per_byte_report(
        model_dir,
        {lang: [Path(p) for p in paths] for lang, paths in req.files.items()},
        max_docs=req.max_docs,
        max_bytes=req.max_bytes,
        seq_len=req.seq_len,
        device=req.device,
    )
    digest = store.resolve(req.checkpoint)
    manifest = EvalReportManifest(
        name=f"eval-{req.label}" if req.label else "eval",
        model_digest=digest,
        metrics={"bpb": {k: v.bpb for k, v in report.items()}, "details": report_to_json(report)},
        parents=[digest],
    )
    return store.publish(manifest, ref=req.out_ref)


def export(req: ExportRequest) -> CheckpointManifest:
    """The checkpoint as a verified Hugging Face folder, published as an `hf` checkpoint artifact."""
    from vinasmol_core.model import export_hf, publish_checkpoint

    store = open_store(req.store_url)
    src = store.fetch(req.checkpoint)
    with scratch_dir("export") as tmp:
        out = export_hf(src, tmp / "hf", dtype=req.dtype, card=req.card)
        return publish_checkpoint(
            store,
            out,
            "hf",
            ref=req.out_ref,
            name=req.card.get("title", "export"),
            stage="export",
            parents=[store.resolve(req.checkpoint)],
        )
