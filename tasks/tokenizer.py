"""The tokenizer steps, one cached Prefect task each (recipe section `tokenizer`).

- `train_tokenizer` ("train-tokenizer"): count the pre-tokenized words of the training corpora
  (`vinasmol_core.tokenizer.count_words`) and publish the counts (a `DatasetManifest` whose
  `extra.content` is "word-counts"), the statistics the new merges are learned from.
- `merge_vocabulary` ("merge-vocabulary"): extend the base tokenizer with merges learned on those
  counts (`vinasmol_core.tokenizer.extend_tokenizer`), measure fertility of base against extended,
  publish the tokenizer folder (a `TokenizerManifest`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tasks.common import corpus_rows, open_store, scratch_dir, step, val_files
from vinasmol_core.common.manifests import DatasetManifest, TokenizerManifest
from vinasmol_core.common.steps import Step
from vinasmol_core.plan.recipe import CorpusSpec, TokenizerSection


@step(Step.TRAIN_TOKENIZER)
def train_tokenizer(
    base_model: str,
    corpora: list[CorpusSpec],
    corpus_digests: dict[str, str],
    section: TokenizerSection,
    store_url: str,
    hub_mirror: str | None = None,
    val_fraction: float = 0.0,
) -> DatasetManifest:
    """Word counts of the tokenizer's training corpora, split by the pre-tokenizer of the base model's
    tokenizer.json (`base_model`: ref or digest of an artifact holding it). A hub corpus is streamed
    up to its budget (and to `section.max_docs` documents when set), without the documents the data
    step holds out for validation (`val_fraction`: `data.val_fraction`)."""
    from vinasmol_core.tokenizer import count_words

    store = open_store(store_url)
    pre = store.fetch(base_model)
    with scratch_dir("tokenizer") as tmp:
        # one lazy stream over the corpora: rows are counted as they are read, never held all at once
        items = itertools.chain.from_iterable(
            corpus_rows(corpus, tmp / "corpora" / corpus.name, hub_mirror, section.max_docs,
                        val_fraction=val_fraction)
            for corpus in corpora)
        counts = count_words(items, "text", pre_tokenizer=pre)
        counts.save(tmp / "word-counts")
        manifest = DatasetManifest(
            name="word-counts",
            source_digests=corpus_digests,
            stats=counts.stats.model_dump(),
            parents=[store.resolve(base_model)],
            extra={"content": "word-counts"},
        )
        return store.publish(manifest, tmp / "word-counts")


@step(Step.MERGE_VOCABULARY)
def merge_vocabulary(
    base_model: str,
    word_counts: str,
    section: TokenizerSection,
    eval_corpora: list[CorpusSpec],
    store_url: str,
    val_fraction: float = 0.0,
    hub_mirror: str | None = None,
) -> TokenizerManifest:
    """Extend the base tokenizer with the new language's merges; publish it with its fertility report
    (base against extended, on the validation documents of the main corpora)."""
    from vinasmol_core.tokenizer import WordCounts, extend_tokenizer, fertility_report
    from vinasmol_core.tokenizer.publish import tokenizer_manifest

    store = open_store(store_url)
    base_dir = store.fetch(base_model)
    counts = WordCounts.load(store.fetch(word_counts))
    with scratch_dir("merge") as tmp:
        result = extend_tokenizer(base_dir, counts, section.target_vocab_size, tmp / "tokenizer")
        files = val_files(eval_corpora, tmp / "val", ["vi", "en", "code"], val_fraction, hub_mirror)
        report = None
        if files:
            eval_files = {lang: [Path(p) for p in paths] for lang, paths in files.items()}
            report = fertility_report({"base": base_dir, "extended": result.out_dir}, eval_files)
        manifest = tokenizer_manifest(
            result, report, parents=[store.resolve(base_model), store.resolve(word_counts)]
        )
        return store.publish(manifest, Path(result.out_dir))
