"""Training data: ingest, clean, deduplicate, split, tokenize and pack corpora; sample mixtures.

The pieces (see each module):
    spec       SourceSpec, CleaningSpec, LongContextSpec, DatasetInfo
    readers    JSONL(.gz) / Parquet / text files, globs, fsspec URLs, `datasets` by name
    clean      normalisation and light filters
    prepare    prepare_dataset: the whole build, streamed, into a reusable dataset folder
    shards     the on-disk token format (.npy, no pickle) and its memory-mapped reader
    sampler    MixtureSampler: deterministic, resumable, rank-disjoint fixed-length sequences
    tokcheck   tokenizer_digest / check_tokenizer
"""

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
from vinasmol_core.data.spec import CleaningSpec, DatasetInfo, LongContextSpec, SourceSpec, SourceStats
from vinasmol_core.data.tokcheck import check_tokenizer, dataset_tokenizer_digest, tokenizer_digest

__all__ = [
    "DATASET_FILE",
    "CleaningSpec",
    "DatasetInfo",
    "LongContextSpec",
    "MixtureSampler",
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
