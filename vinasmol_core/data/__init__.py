"""Training data: ingest, clean, deduplicate, split, tokenize and pack corpora; sample mixtures.

The pieces (see each module):
    spec       SourceSpec, CleaningSpec, PrepareSettings, LongContextSpec, DatasetInfo
    readers    JSONL(.gz) / Parquet / text files, globs, fsspec URLs, `datasets` by name
    clean      normalisation and light filters
    curation   CurationSpec: the curation filters' settings, per language
    curate     Curator: encoding repair, C4/Gopher/FineWeb/flagged-word filters, PII redaction
    prepare    prepare_dataset: the whole build, streamed, into a reusable dataset folder
    shards     the on-disk token format (.npy, no pickle) and its memory-mapped reader
    sampler    MixtureSampler: deterministic, resumable, rank-disjoint fixed-length sequences
    tokcheck   tokenizer_digest / check_tokenizer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vinasmol_core.data.curation import CurationSpec
    from vinasmol_core.data.prepare import (
        DATASET_FILE,
        dataset_manifest,
        load_dataset_meta,
        prepare_dataset,
        split_of,
    )
    from vinasmol_core.data.sampler import (
        MixtureSampler,
        SequenceStream,
        resolve_weight_keys,
        validation_sequences,
    )
    from vinasmol_core.data.spec import (
        CleaningSpec,
        DatasetInfo,
        FilterStats,
        LongContextSpec,
        PrepareSettings,
        SourceSpec,
        SourceStats,
    )
    from vinasmol_core.data.tokcheck import check_tokenizer, dataset_tokenizer_digest, tokenizer_digest

# Each name's module, imported on first use: a data worker process imports only what it needs.
_MODULE_OF = {
    "DATASET_FILE": "prepare", "dataset_manifest": "prepare", "load_dataset_meta": "prepare",
    "prepare_dataset": "prepare", "split_of": "prepare",
    "MixtureSampler": "sampler", "SequenceStream": "sampler", "resolve_weight_keys": "sampler",
    "validation_sequences": "sampler",
    "CleaningSpec": "spec", "DatasetInfo": "spec", "LongContextSpec": "spec", "PrepareSettings": "spec",
    "SourceSpec": "spec", "SourceStats": "spec", "FilterStats": "spec", "CurationSpec": "curation",
    "check_tokenizer": "tokcheck", "dataset_tokenizer_digest": "tokcheck", "tokenizer_digest": "tokcheck",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "DATASET_FILE",
    "CleaningSpec",
    "CurationSpec",
    "DatasetInfo",
    "FilterStats",
    "LongContextSpec",
    "MixtureSampler",
    "PrepareSettings",
    "SequenceStream",
    "SourceSpec",
    "SourceStats",
    "check_tokenizer",
    "dataset_manifest",
    "dataset_tokenizer_digest",
    "load_dataset_meta",
    "prepare_dataset",
    "resolve_weight_keys",
    "split_of",
    "tokenizer_digest",
    "validation_sequences",
]
