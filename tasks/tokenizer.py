"""The bodies of the tokenizer steps: typed (Pydantic) requests in, manifests out.

- `train_tokenizer` ("train tokenizer"): count the pre-tokenized words of the training corpus and
  publish the counts (a `DatasetManifest` whose `extra.content` is "word-counts").
- `merge_vocabulary` ("merge vocabulary"): extend the base tokenizer with merges learned on those
  counts, measure fertility, publish the tokenizer folder (a `TokenizerManifest`).

Plain functions: the Prefect tasks (cache keys, result storage) are the steps in `tasks.pipeline`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from tasks.common import open_store, scratch_dir
from vinasmol_core.manifests import DatasetManifest, TokenizerManifest


class TrainTokenizerRequest(BaseModel):
    store_url: str
    corpus: list[str] = Field(description="local JSONL(.gz) / Parquet / text files or folders")
    text_field: str = "text"
    base: str | None = Field(default=None, description="ref or digest of an artifact holding the base "
                             "tokenizer.json (its pre-tokenizer); default SmolLM2's")
    corpus_digests: dict[str, str] = Field(default_factory=dict,
                                           description="lineage of the corpus files")
    out_ref: str | None = None


class MergeVocabularyRequest(BaseModel):
    store_url: str
    base: str = Field(description="ref or digest of an artifact holding the base tokenizer.json")
    word_counts: str = Field(description="ref or digest of the word-counts artifact")
    target_vocab_size: int = 55936
    eval_files: dict[str, list[str]] = Field(default_factory=dict,
                                             description="language -> local files for the fertility report")
    out_ref: str | None = None






def train_tokenizer(request: TrainTokenizerRequest) -> DatasetManifest:
    """Count the corpus's pre-tokenized words and publish the counts."""
    from vinasmol_core.tokenizer import count_words

    store = open_store(request.store_url)
    pre = store.fetch(request.base) if request.base else None
    counts = count_words([Path(p) for p in request.corpus], request.text_field, pre_tokenizer=pre)
    with scratch_dir("word-counts") as tmp:
        counts.save(tmp)
        manifest = DatasetManifest(
            name="word-counts",
            source_digests=request.corpus_digests,
            stats=counts.stats.model_dump(),
            parents=[store.resolve(request.base)] if request.base else [],
            extra={"content": "word-counts"},
        )
        return store.publish(manifest, tmp, ref=request.out_ref)


def merge_vocabulary(request: MergeVocabularyRequest) -> TokenizerManifest:
    """Extend the base tokenizer with merges learned on the word counts; publish it with its
    fertility report (base against extended)."""
    from vinasmol_core.tokenizer import WordCounts, extend_tokenizer, fertility_report
    from vinasmol_core.tokenizer.publish import tokenizer_manifest

    store = open_store(request.store_url)
    base_dir = store.fetch(request.base)
    counts = WordCounts.load(store.fetch(request.word_counts))
    with scratch_dir("tokenizer") as tmp:
        result = extend_tokenizer(base_dir, counts, request.target_vocab_size, tmp / "tokenizer")
        report = None
        if request.eval_files:
            files = {lang: [Path(p) for p in paths] for lang, paths in request.eval_files.items()}
            report = fertility_report({"base": base_dir, "extended": result.out_dir}, files)
        manifest = tokenizer_manifest(
            result, report,
            parents=[store.resolve(request.base), store.resolve(request.word_counts)],
        )
        return store.publish(manifest, Path(result.out_dir), ref=request.out_ref)
