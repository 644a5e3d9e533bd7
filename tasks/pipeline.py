"""The pipeline's steps, one Prefect task each (`tasks.common.step`: the cached unit).

A step turns the recipe section it reads into the request of its body in `tasks.tokenizer`,
`tasks.data` or `tasks.model` (plain functions with typed requests), which fetches the
input artifacts from the store, calls `vinasmol_core` and publishes the output artifact; the step
returns that manifest. Training stages run `vinasmol_core.train.run_stage_process` (or the stage
deployment) directly.

Every argument is part of the step's cache key except `store_url` and the other names in
`tasks.common.EXCLUDED_ARGS` (or a step's own `exclude`). Inputs are passed as artifact digests, and
the recipe section a step reads as plain data (corpora with the sha256 of their files), so the key
is exactly "what this step computes"; temporary file paths never enter it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.common import open_store, scratch_dir, step
from vinasmol_core.errors import VinaSmolError
from vinasmol_core.manifests import (
    CheckpointManifest,
    DatasetManifest,
    EvalReportManifest,
    TokenizerManifest,
)
from vinasmol_core.train.spec import StageJob, StageSpec

FAIL_AT_ENV = "VINASMOL_FAIL_AT"  # "<stage>:<step>": debugging, never part of a cache key


# ----------------------------------------------------------------------------- corpora
def materialize_corpus(corpus: dict[str, Any], out_dir: Path) -> tuple[list[Path], list[Path]]:
    """Local (train, val) JSONL files of one recipe corpus; built-in samples are written to out_dir."""
    source = corpus["source"]
    if source["kind"] == "files":
        train = [Path(p) for p in source["train"]]
        val = [Path(p) for p in source.get("val") or []]
        for path in [*train, *val]:
            if not path.is_file():
                raise VinaSmolError(f"corpus {corpus['name']}: file {path} does not exist")
        return train, val
    from vinasmol_core.builtin.sample_corpus import sample_texts

    lang, docs, val_docs = corpus["lang"], source["docs"], source["val_docs"]
    texts = sample_texts(lang, docs + val_docs, source["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, part in (("train", texts[:docs]), ("val", texts[docs:])):
        path = out_dir / f"{corpus['name']}-{split}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for i, text in enumerate(part):
                row = {"id": f"{corpus['name']}-{split}-{i}", "text": text, "source": corpus["name"]}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append([path])
    return paths[0], paths[1]


def corpus_digest(corpus: dict[str, Any]) -> str:
    """What a corpus's content depends on: its spec, and for local files their sha256."""
    import hashlib

    source = corpus["source"]
    h = hashlib.sha256(json.dumps(corpus, sort_keys=True).encode())
    if source["kind"] == "files":
        for p in [*source["train"], *(source.get("val") or [])]:
            path = Path(p)
            if not path.is_file():
                raise VinaSmolError(f"corpus {corpus['name']}: file {path} does not exist")
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def val_files(corpora: list[dict[str, Any]], out_dir: Path, languages: list[str]) -> dict[str, list[Path]]:
    """Validation files per language, from the main corpora (annealing data never changes evals)."""
    files: dict[str, list[Path]] = {}
    for corpus in corpora:
        if corpus["role"] != "main" or corpus["lang"] not in languages:
            continue
        train, val = materialize_corpus(corpus, out_dir / corpus["name"])
        files.setdefault(corpus["lang"], []).extend(val or train[:1])
    return files


# ----------------------------------------------------------------------------- steps
@step("base-model")
def fetch_base_model(source: dict[str, Any], name: str, store_url: str) -> CheckpointManifest:
    """The English base model as an `hf` checkpoint artifact (tokenizer files included)."""
    store = open_store(store_url)
    kind = source["kind"]
    if kind == "hf" and source["path"].startswith("store:"):
        manifest = store.get_manifest(source["path"][len("store:") :])
        if not isinstance(manifest, CheckpointManifest) or manifest.format != "hf":
            raise VinaSmolError(f"base_model.source.path: {source['path']} is not an hf checkpoint artifact")
        return manifest
    with scratch_dir("base") as tmp:
        if kind == "tiny":
            from vinasmol_core.builtin.tiny import build_tiny_base_model, build_tiny_tokenizer

            tok = build_tiny_tokenizer(tmp / "tokenizer", vocab_size=source["vocab_size"])
            params = {
                k: source[k]
                for k in (
                    "n_layer",
                    "n_embd",
                    "n_head",
                    "n_query_groups",
                    "intermediate_size",
                    "block_size",
                    "rope_base",
                    "seed",
                )
            }
            hf_dir = build_tiny_base_model(tmp / "model", tok, **params)
        elif kind == "smollm2-135m":
            from vinasmol_core.builtin.smollm2 import build_smollm2_135m

            hf_dir = build_smollm2_135m(tmp / "model")
        else:
            from tasks.model import FetchBaseRequest
            from tasks.model import fetch_base_model as fetch_hf

            return fetch_hf(FetchBaseRequest(store_url=store_url, source=source["path"], name=name))
        from vinasmol_core.model import publish_checkpoint

        return publish_checkpoint(store, hf_dir, "hf", name=name, stage="base")


@step("tokenizer")
def train_tokenizer(
    base_model: str,
    corpora: list[dict[str, Any]],
    corpus_digests: dict[str, str],
    section: dict[str, Any],
    store_url: str,
) -> DatasetManifest:
    """Word counts of the tokenizer's training corpora, split by the base tokenizer's own
    pre-tokenizer (the statistics the new merges are learned from)."""
    from tasks.tokenizer import TrainTokenizerRequest
    from tasks.tokenizer import train_tokenizer as count_task

    with scratch_dir("tokenizer") as tmp:
        files: list[str] = []
        for corpus in corpora:
            train, _ = materialize_corpus(corpus, tmp / "corpora" / corpus["name"])
            files.extend(str(p) for p in train)
        request = TrainTokenizerRequest(
            store_url=store_url, corpus=files, base=base_model, corpus_digests=corpus_digests
        )
        return count_task(request)


@step("merge-vocabulary")
def merge_vocabulary(
    base_model: str,
    word_counts: str,
    section: dict[str, Any],
    eval_corpora: list[dict[str, Any]],
    store_url: str,
) -> TokenizerManifest:
    """Extend the base tokenizer with the new language's merges; fertility of base vs merged."""
    from tasks.tokenizer import MergeVocabularyRequest
    from tasks.tokenizer import merge_vocabulary as merge_task

    with scratch_dir("merge") as tmp:
        files = val_files(eval_corpora, tmp / "val", ["vi", "en", "code"])
        request = MergeVocabularyRequest(
            store_url=store_url,
            base=base_model,
            word_counts=word_counts,
            target_vocab_size=section["target_vocab_size"],
            eval_files={lang: [str(p) for p in paths] for lang, paths in files.items()},
        )
        return merge_task(request)


@step("data", exclude=("tokenizer_artifact",))
def prepare_data(
    role: str,
    corpora: list[dict[str, Any]],
    corpus_digests: dict[str, str],
    section: dict[str, Any],
    tokenizer_sha: str,
    tokenizer_artifact: str,
    store_url: str,
) -> DatasetManifest:
    """Clean, dedup, tokenize and pack the corpora of one dataset (`main`, or `annealing` = main +
    annealing sources). Keyed on the tokenizer's content, not on the artifact that carries it."""
    from tasks.data import prepare_data as prepare_task
    from vinasmol_core.data import CleaningSpec, PrepareSettings, SourceSpec

    store = open_store(store_url)
    tok_dir = store.fetch(tokenizer_artifact)
    with scratch_dir(f"data-{role}") as tmp:
        sources = []
        for corpus in corpora:
            train, _ = materialize_corpus(corpus, tmp / "corpora" / corpus["name"])
            sources.append(
                SourceSpec(
                    name=corpus["name"],
                    paths=[str(p) for p in train],
                    lang=corpus["lang"],
                    role=corpus["role"],
                    text_field=corpus.get("text_field", "text"),
                )
            )
        info = prepare_task(
            sources,
            tok_dir,
            tmp / "dataset",
            PrepareSettings(
                cleaning=CleaningSpec(**section.get("cleaning", {})),
                val_fraction=section["val_fraction"],
                dedup=section["dedup"],
                near_dedup=section["near_dedup"],
            ),
            store_url=store_url,
            ref=f"datasets/{role}",
        )
        if not info.manifest_digest:
            raise VinaSmolError(f"data ({role}): the dataset was not published to the store")
        manifest = store.get_manifest(info.manifest_digest)
        if not isinstance(manifest, DatasetManifest):
            raise VinaSmolError(f"data ({role}): {info.manifest_digest} is not a dataset artifact")
        return manifest


@step("embeddings")
def init_embeddings(
    base_model: str, tokenizer: str, section: dict[str, Any], store_url: str
) -> CheckpointManifest:
    """Resize the base model's tied embedding to the merged vocabulary and initialise the new rows."""
    from tasks.model import InitEmbeddingsRequest
    from tasks.model import init_embeddings as init_task

    request = InitEmbeddingsRequest(
        store_url=store_url,
        base_model=base_model,
        tokenizer=tokenizer,
        init=section["method"],
        translations=section.get("translations"),
        blend=section["blend"],
    )
    return init_task(request)


@step("convert")
def convert_to_litgpt(hf_model: str, litgpt_name: str | None, store_url: str) -> CheckpointManifest:
    """The extended HF model as a litgpt checkpoint (lit_model.pth, model_config.yaml, tokenizer)."""
    from tasks.model import ConvertRequest
    from tasks.model import convert_to_litgpt as convert_task

    return convert_task(ConvertRequest(store_url=store_url, hf_model=hf_model, litgpt_name=litgpt_name))


class TrainedStage(BaseModel):
    """A training stage's result: its final checkpoint manifest and the metrics it streamed."""

    checkpoint: CheckpointManifest
    events: list[dict[str, Any]] = Field(default_factory=list)
    duration_s: float = 0.0


class _Progress:
    """Turns the stage's metrics stream into a Prefect progress artifact (rate-limited)."""

    def __init__(self, stage: str, total_steps: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total = max(total_steps, 1)
        self.events: list[dict[str, Any]] = []
        self.last_push = 0.0
        self.last_value = -1.0
        self.lock = threading.Lock()
        try:
            self.artifact_id = create_progress_artifact(
                progress=0.0, key=f"progress-{_slug(stage)}", description=f"training stage {stage}"
            )
        except Exception:  # progress is best effort, never the reason a stage fails
            self.artifact_id = None

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)
            step_no = event.get("step")
            if not isinstance(step_no, int) or self.artifact_id is None:
                return
            value = min(100.0, 100.0 * step_no / self.total)
            now = time.monotonic()
            if value > self.last_value and (now - self.last_push > 1.0 or value >= 100.0):
                self._push(value)

    def _push(self, value: float) -> None:
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.artifact_id, progress=value)
            self.last_value, self.last_push = value, time.monotonic()
        except Exception:
            pass

    def finish(self) -> None:
        if self.artifact_id is not None and self.last_value < 100.0:
            self._push(100.0)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "stage"


def fail_at_step_for(stage: str) -> int | None:
    """$VINASMOL_FAIL_AT="<stage>:<step>" injects a failure (tests of resume); never cached."""
    value = os.environ.get(FAIL_AT_ENV, "")
    if ":" not in value:
        return None
    name, _, at = value.rpartition(":")
    return int(at) if name == stage and at.strip().isdigit() else None


@step("train", exclude=("partial_suffix",))
def train_stage(
    spec: StageSpec,
    init_checkpoint: str,
    dataset: str,
    store_url: str,
    stage_runner: str = "inline",
    partial_suffix: str = "",
) -> TrainedStage:
    """One training stage in its own process; resumes from the stage's newest partial checkpoint.

    Partial checkpoints live under a prefix derived from what the stage computes (spec, init, data),
    so a retry of the same run, or a new run of the same recipe, continues where the stage stopped.
    A forced stage gets a per-run suffix and so starts over."""
    from vinasmol_core.train import run_stage_process

    t0 = time.perf_counter()
    job = StageJob(
        spec=spec,
        init_checkpoint=init_checkpoint,
        dataset=dataset,
        store_url=store_url,
        fail_at_step=fail_at_step_for(spec.name),
    )
    key = job.resume_key()[:16]
    job.out_ref = f"stages/{spec.name}/{key}"
    job.partial_ref_prefix = f"partial/{spec.name}/{key}{partial_suffix}"
    if stage_runner == "deployment":
        from flows.remote import run_stage_deployment

        manifest = run_stage_deployment(job)
        return TrainedStage(checkpoint=manifest, events=[], duration_s=time.perf_counter() - t0)
    progress = _Progress(spec.name, spec.total_steps)
    manifest = run_stage_process(job, on_metrics=progress)
    progress.finish()
    return TrainedStage(
        checkpoint=manifest, events=_condense(progress.events), duration_s=time.perf_counter() - t0
    )


def _condense(events: list[dict[str, Any]], limit: int = 2000) -> list[dict[str, Any]]:
    """Keep the metrics small enough for a task result (every k-th train event, all eval events)."""
    train = [e for e in events if "loss" in e]
    other = [e for e in events if "loss" not in e]
    if len(train) > limit:
        k = -(-len(train) // limit)
        train = train[::k] + [train[-1]]
    keep = []
    for e in [*train, *other]:
        keep.append({k: v for k, v in e.items() if isinstance(v, (int, float, str, bool)) or v is None})
    return keep


@step("evaluate")
def evaluate(
    checkpoint: str,
    label: str,
    section: dict[str, Any],
    eval_corpora: list[dict[str, Any]],
    store_url: str,
) -> EvalReportManifest:
    """Bits per byte of a checkpoint on each language's validation documents (main corpora)."""
    from tasks.model import EvaluateRequest
    from tasks.model import evaluate as evaluate_task

    with scratch_dir("eval") as tmp:
        files = val_files(eval_corpora, tmp / "val", section["languages"])
        request = EvaluateRequest(
            store_url=store_url,
            checkpoint=checkpoint,
            files={lang: [str(p) for p in paths] for lang, paths in files.items()},
            label=label,
            max_docs=section.get("max_docs"),
            seq_len=section["seq_len"],
        )
        return evaluate_task(request)


@step("export")
def export(checkpoint: str, section: dict[str, Any], store_url: str) -> CheckpointManifest:
    """The final checkpoint as a verified Hugging Face folder (logits parity checked)."""
    from tasks.model import ExportRequest
    from tasks.model import export as export_task

    card = {"title": section["name"], **section.get("card", {})}
    return export_task(
        ExportRequest(store_url=store_url, checkpoint=checkpoint, dtype=section["dtype"], card=card)
    )
