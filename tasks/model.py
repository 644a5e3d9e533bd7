"""The model steps, one cached Prefect task each: artifact digests and a typed recipe section in,
the published manifest out.

- `fetch_base_model` ("fetch-base-model", `base_model.source`): the English base model as an `hf`
  checkpoint (a tiny random model, the real SmolLM2-135M, an HF folder or hub id, or an artifact).
- `init_embeddings` ("init-embeddings", `embedding_init`): `vinasmol_core.model.extend_model`.
- `convert_to_litgpt` ("convert-to-litgpt"): `vinasmol_core.model.hf_to_litgpt`.
- `evaluate` ("evaluate", `eval`): `vinasmol_core.model.bits_per_byte_report` per language, and where
  the section asks, `long_context.long_context_report` and `harness.run_harness`.
- `export` ("export", `export`): `vinasmol_core.model.export_hf`, logits parity checked.

Each fetches its inputs from the store, works in a scratch folder and publishes its output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import corpus_rows, open_store, run_logger, scratch_dir, step, val_files
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest, EvalReportManifest
from vinasmol_core.common.steps import Step
from vinasmol_core.plan.recipe import (
    BaseSource,
    CorpusSpec,
    EmbeddingInitSection,
    EvalSection,
    ExportSection,
    HFBase,
    HubBase,
    SmolLM2Base,
    TinyBase,
    UpscaleSection,
)
from vinasmol_core.store import ArtifactStore


def _build_base(source: BaseSource, tmp: Path, hub_mirror: str | None = None) -> Path:
    """A local HF folder of the base model `source` names (built, copied or downloaded into tmp)."""
    if isinstance(source, TinyBase):
        from vinasmol_core.builtin.tiny import build_tiny_base_model, build_tiny_tokenizer

        tok = build_tiny_tokenizer(tmp / "tokenizer", vocab_size=source.vocab_size)
        params = source.model_dump(exclude={"kind", "vocab_size"})
        return build_tiny_base_model(tmp / "model", tok, **params)
    if isinstance(source, SmolLM2Base):
        from vinasmol_core.builtin.smollm2 import build_smollm2_135m

        return build_smollm2_135m(tmp / "model")
    from vinasmol_core.model import fetch_base_model as fetch

    if isinstance(source, HubBase):
        from vinasmol_core.hub import fetch_model

        mirror = Path(hub_mirror) if hub_mirror else None
        return fetch(fetch_model(source.repo, source.revision, source.allow_patterns, mirror))
    return fetch(source.path, None if Path(source.path).is_dir() else tmp / "model")


def _base_artifact(store: ArtifactStore, path: str) -> CheckpointManifest:
    manifest = store.get_manifest(path)
    if not isinstance(manifest, CheckpointManifest) or manifest.format != "hf":
        raise VinaSmolError(f"base_model.source.path: {path} is not an hf checkpoint artifact")
    return manifest


@step(Step.FETCH_BASE_MODEL)
def fetch_base_model(
    source: BaseSource, name: str, store_url: str, source_digest: str = "", hub_mirror: str | None = None
) -> CheckpointManifest:
    """The English base model as an `hf` checkpoint artifact (tokenizer files included). A hub model
    comes from the hub mirror when one is given (`source_digest`, keyed, is then its folder's
    digest), else from its snapshot in the HF cache."""
    from vinasmol_core.model import publish_checkpoint

    store = open_store(store_url)
    if isinstance(source, HFBase) and source.path.startswith("store:"):
        return _base_artifact(store, source.path[len("store:") :])
    with scratch_dir("base") as tmp:
        return publish_checkpoint(store, _build_base(source, tmp, hub_mirror), "hf", name=name, stage="base")


def distill_corpus(
    section: EmbeddingInitSection, corpora: list[CorpusSpec], tmp: Path, hub_mirror: str | None = None,
    val_fraction: float = 0.0,
) -> list[tuple[Any, float]]:
    """The distill init's training text: (rows of a main corpus, weight) for each language of
    `section.distill.languages` that has main corpora, its share split equally among them. Read as
    the tokenizer step reads its text (train files, or a hub corpus's stream up to a document cap,
    without the documents the data step holds out for validation: `val_fraction`)."""
    spec = section.distill
    out: list[tuple[Any, float]] = []
    for lang, share in spec.languages.items():
        members = [c for c in corpora if c.role == "main" and c.lang == lang]
        for corpus in members:
            cap = spec.tokens // 8 + 64  # documents: far more than the budget needs
            rows = corpus_rows(corpus, tmp / "corpora" / corpus.name, hub_mirror, max_docs=cap,
                               val_fraction=val_fraction)
            out.append((rows, share / len(members)))
    if not out:
        raise VinaSmolError(
            f"embedding_init.distill.languages: no main corpus in {', '.join(spec.languages)} to distil on"
        )
    return out


@step(Step.INIT_EMBEDDINGS)
def init_embeddings(
    base_model: str,
    tokenizer: str,
    section: EmbeddingInitSection,
    store_url: str,
    corpora: list[CorpusSpec] | None = None,
    corpus_digests: dict[str, str] | None = None,
    hub_mirror: str | None = None,
    val_fraction: float = 0.0,
) -> CheckpointManifest:
    """Resize the base model's tied embedding to the merged vocabulary and initialise the new rows.
    `distill` reads the training text of `corpora` (keyed by `corpus_digests`), never the documents
    the data step holds out for validation (`val_fraction`, data.val_fraction)."""
    from vinasmol_core.model import extend_model, publish_checkpoint
    from vinasmol_core.model.distill import DistillSettings

    store = open_store(store_url)
    base_dir, tok_dir = store.fetch(base_model), store.fetch(tokenizer)
    parents = [store.resolve(base_model), store.resolve(tokenizer)]
    with scratch_dir("embeddings") as tmp:
        corpus, settings = None, None
        if section.method == "distill":
            corpus = distill_corpus(section, corpora or [], tmp, hub_mirror, val_fraction)
            d = section.distill
            settings = DistillSettings(tokens=d.tokens, seq_len=d.seq_len, batch_size=d.batch_size, lr=d.lr,
                                       layers=d.layers, seed=d.seed, device=d.device)
        out = extend_model(base_dir, tok_dir, tmp / "model", init=section.method,
                           translations=section.translations, blend=section.blend, corpus=corpus,
                           distill=settings, log=run_logger().info)
        return publish_checkpoint(store, out, "hf", name="extended", stage="embeddings", parents=parents)


@step(Step.CONVERT_TO_LITGPT)
def convert_to_litgpt(hf_model: str, litgpt_name: str | None, store_url: str) -> CheckpointManifest:
    """The extended HF model as a litgpt checkpoint (lit_model.pth, model_config.yaml, tokenizer;
    logits parity checked)."""
    from vinasmol_core.model import hf_to_litgpt, publish_checkpoint

    store = open_store(store_url)
    hf_dir = store.fetch(hf_model)
    with scratch_dir("convert") as tmp:
        out = hf_to_litgpt(hf_dir, tmp / "litgpt", litgpt_name)
        return publish_checkpoint(store, out, "litgpt", name="converted", stage="convert",
                                  parents=[store.resolve(hf_model)])


@step(Step.UPSCALE_DEPTH)
def upscale_depth(checkpoint: str, section: UpscaleSection, store_url: str) -> CheckpointManifest:
    """The litgpt checkpoint up-scaled in depth (SOLAR): two copies of its blocks, 2 x
    `layers_from_each_copy` in all."""
    from vinasmol_core.model import publish_checkpoint
    from vinasmol_core.model.upscale import upscale_depth as upscale

    store = open_store(store_url)
    src = store.fetch(checkpoint)
    with scratch_dir("upscale") as tmp:
        out = upscale(src, tmp / "litgpt", section.layers_from_each_copy)
        return publish_checkpoint(store, out, "litgpt", name="upscaled", stage="upscale",
                                  parents=[store.resolve(checkpoint)],
                                  extra={"upscale": section.model_dump(mode="json")})


def _long_metrics(model_dir: Path, section: EvalSection, corpora: list[CorpusSpec], tmp: Path,
                  val_fraction: float, hub_mirror: str | None) -> dict:
    from vinasmol_core.model.long_context import long_context_report

    long = section.long
    files = val_files(corpora, tmp / "val", list(long.languages), val_fraction, hub_mirror)
    return long_context_report(
        model_dir, {lang: [Path(p) for p in paths] for lang, paths in files.items()},
        length=long.length, passkey_lengths=list(long.passkey_lengths), depths=list(long.depths),
        trials=long.trials, max_docs=long.max_docs,
    )


def _harness_metrics(model_dir: Path, section: EvalSection, corpora: list[CorpusSpec], tmp: Path,
                     val_fraction: float, hub_mirror: str | None) -> dict:
    """Harness scores; the recipe's cloze tasks are written from the validation text first."""
    from vinasmol_core.model.bpb import select_documents
    from vinasmol_core.model.harness import cloze_items, run_harness, write_choice_task

    harness = section.harness
    include = [Path(harness.include_path)] if harness.include_path else []
    if harness.cloze:
        files = val_files(corpora, tmp / "val", [c.lang for c in harness.cloze], val_fraction, hub_mirror)
        for cloze in harness.cloze:
            docs = select_documents([Path(p) for p in files.get(cloze.lang, [])], max_docs=cloze.items * 4)
            items = cloze_items(docs, cloze.items)
            if not items:
                raise VinaSmolError(f"eval.harness.cloze: no {cloze.lang} validation text to build a task")
            write_choice_task(tmp / "tasks", f"vinasmol_cloze_{cloze.lang}", items)
        include.append(tmp / "tasks")
    return run_harness(model_dir, harness.task_names(), limit=harness.limit, num_fewshot=harness.num_fewshot,
                       include_path=include)


@step(Step.EVALUATE)
def evaluate(
    checkpoint: str,
    label: str,
    section: EvalSection,
    eval_corpora: list[CorpusSpec],
    store_url: str,
    val_fraction: float = 0.0,
    hub_mirror: str | None = None,
    include_digest: str = "",
) -> EvalReportManifest:
    """Bits per byte of a checkpoint on each language's validation documents (main corpora); the
    long-context checks and the harness tasks where the section asks for them (`EvalSection.for_label`);
    published as an eval report. `include_digest` keys the cache on the harness's local task files."""
    from vinasmol_core.model import bits_per_byte_report
    from vinasmol_core.model.bpb import report_to_json

    store = open_store(store_url)
    model_dir = store.fetch(checkpoint)
    with scratch_dir("eval") as tmp:
        files = val_files(eval_corpora, tmp / "val", list(section.languages), val_fraction, hub_mirror)
        report = bits_per_byte_report(
            model_dir,
            {lang: [Path(p) for p in paths] for lang, paths in files.items()},
            max_docs=section.max_docs,
            max_bytes=section.max_bytes,
            seq_len=section.seq_len,
            device="cpu",
        )
        metrics: dict = {"bpb": {k: v.bpb for k, v in report.items()}, "details": report_to_json(report)}
        if section.long.after:
            metrics["long"] = _long_metrics(model_dir, section, eval_corpora, tmp, val_fraction, hub_mirror)
        if section.harness.after:
            metrics["harness"] = _harness_metrics(
                model_dir, section, eval_corpora, tmp, val_fraction, hub_mirror
            )
    digest = store.resolve(checkpoint)
    manifest = EvalReportManifest(
        name=f"eval-{label}" if label else "eval", model_digest=digest, metrics=metrics, parents=[digest]
    )
    return store.publish(manifest)


@step(Step.EXPORT)
def export(checkpoint: str, section: ExportSection, store_url: str) -> CheckpointManifest:
    """The final checkpoint as a verified Hugging Face folder (logits parity checked), published as an
    `hf` checkpoint artifact."""
    from vinasmol_core.model import export_hf, publish_checkpoint

    store = open_store(store_url)
    src = store.fetch(checkpoint)
    card = {"title": section.name, **section.card}
    with scratch_dir("export") as tmp:
        out = export_hf(src, tmp / "hf", dtype=section.dtype, card=card)
        return publish_checkpoint(store, out, "hf", name=card.get("title", "export"), stage="export",
                                  parents=[store.resolve(checkpoint)])
