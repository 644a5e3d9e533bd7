"""Build a dataset artifact: read, clean, deduplicate, split, tokenize and pack every source.

Streaming throughout. The main process reads the sources and hands batches of raw lines to worker
processes (one per core, spawned while it reads the tokenizer), which parse, clean, hash and
tokenize them (see worker.py, which also holds the pool). It takes their results in order, drops
duplicates, checks sampled documents against the tokenizer and writes token shards as they fill, so
peak memory does not grow with the corpus (exact deduplication keeps 8 bytes plus set overhead per
document; near-duplicate detection keeps its LSH index in memory). Small local inputs are processed
in-process.

The result folder (see shards.py for the layout) is built in a temporary sibling folder and
renamed into place only when complete. Its key, a digest of the source digests, the cleaning,
split and dedup settings and the tokenizer digest, lets a second call with unchanged inputs
return at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.data.clean import FILTERS
from vinasmol_core.data.curate import QUALITY_FILTERS, load_flagged_words
from vinasmol_core.data.fastbpe import BPETables
from vinasmol_core.data.readers import (
    ReadCounters,
    ResolvedFile,
    auto_workers,
    iter_batches,
    resolve_files,
    source_digest,
)
from vinasmol_core.data.shards import ShardWriter, dtype_for_vocab
from vinasmol_core.data.spec import DatasetInfo, FilterStats, PrepareSettings, SourceSpec, SourceStats
from vinasmol_core.data.tokcheck import EOS_TOKEN, tokenizer_digest, tokenizer_file
from vinasmol_core.data.worker import (
    Batch,
    BatchResult,
    WorkerConfig,
    WorkerPool,
    minhash_scheme,
    split_is_val,
)

if TYPE_CHECKING:
    from vinasmol_core.common.manifests import DatasetManifest
    from vinasmol_core.store import ArtifactStore

log = logging.getLogger(__name__)

FORMAT = "vinasmol-token-shards"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
SPLITS = ("train", "val")
KEY_REF_PREFIX = "datasets/by-key/"
PROGRESS_SECONDS = 5.0  # at most one on_progress call per source this often
# A source with a token budget is read on past its expected bytes (`max_bytes`) until its kept tokens
# meet the budget, up to this many times those bytes (then it falls short, and says so)
READ_ON_FACTOR = 3


def split_of(source: str, doc_id: str, val_fraction: float) -> str:
    """'val' or 'train', from a stable hash of (source name, document id)."""
    return "val" if split_is_val(source, doc_id, val_fraction) else "train"


def _keyed_source(spec: SourceSpec) -> dict[str, Any]:
    """A source as it enters the dataset key: not where its files are (their digest is keyed), and
    its budget only when it has one (so that the keys of unbudgeted sources stay as they were)."""
    out = spec.model_dump(mode="json", exclude={"paths", "hf_data_files", "hf_path"})
    for key in ("max_docs", "max_bytes", "max_tokens"):
        if out[key] is None:
            del out[key]
    return out


def dataset_key(sources: list[SourceSpec], source_digests: dict[str, str], settings: PrepareSettings,
                tokenizer_digest_: str, flagged_words: dict[str, frozenset[str]] | None = None) -> str:
    """A deterministic key for a build: same inputs and settings, same key. The curation settings are
    part of it, with the flagged-word lists by content (not by file name)."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        # where the files are is not part of the key: their content (the digest) is
        "sources": [_keyed_source(s) | {"digest": source_digests[s.name]} for s in sources],
        "cleaning": settings.cleaning.model_dump(mode="json"),
        "val_fraction": settings.val_fraction,
        "dedup": settings.dedup,
        "near_dedup": settings.near_dedup,
        "near_dedup_threshold": settings.near_dedup_threshold if settings.near_dedup else None,
        "tokenizer": tokenizer_digest_,
        "shard_tokens": settings.shard_tokens,
    }
    if settings.curation is not None and settings.curation.enabled:
        payload["curation"] = settings.curation.model_dump(mode="json", exclude=_FLAGGED_PATHS)
        payload["flagged_words"] = {lang: hashlib.sha256("\n".join(sorted(words)).encode()).hexdigest()
                                    for lang, words in sorted((flagged_words or {}).items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / DATASET_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_dataset_meta(dataset_dir: Path | str) -> dict[str, Any]:
    """The parsed dataset.json of a prepared dataset folder (VinaSmolError if it is not one)."""
    meta = _read_meta(Path(dataset_dir))
    if meta is None or meta.get("format") != FORMAT:
        raise VinaSmolError(f"{dataset_dir} is not a prepared dataset (no valid {DATASET_FILE})")
    if meta.get("version") != FORMAT_VERSION:
        raise VinaSmolError(f"{dataset_dir} has dataset format version {meta.get('version')}; "
                            f"this version reads {FORMAT_VERSION}: prepare it again")
    return meta


def _info_from_meta(meta: dict[str, Any], out_dir: Path | None, *, reused: bool,
                    manifest_digest: str | None, seconds: float) -> DatasetInfo:
    return DatasetInfo(
        key=meta["key"],
        dir=out_dir,
        reused=reused,
        manifest_digest=manifest_digest,
        tokenizer_digest=meta["tokenizer_digest"],
        vocab_size=meta["vocab_size"],
        dtype=meta["dtype"],
        token_counts=meta["token_counts"],
        sources={s["name"]: SourceStats(**s["stats"]) for s in meta["sources"]},
        seconds=seconds,
    )


def dataset_manifest(meta: dict[str, Any], name: str = "") -> DatasetManifest:
    """The store manifest describing a dataset folder (files are filled in by ArtifactStore.publish)."""
    from vinasmol_core.common.manifests import DatasetManifest

    shards = [s["path"] for src in meta["sources"] for sp in SPLITS for s in src["splits"][sp]["shards"]]
    return DatasetManifest(
        name=name or f"dataset-{meta['key'][:12]}",
        shards=shards,
        token_counts=meta["token_counts"],
        tokenizer_digest=meta["tokenizer_digest"],
        source_digests={s["name"]: s["digest"] for s in meta["sources"]},
        stats={s["name"]: s["stats"] for s in meta["sources"]},
        extra={"key": meta["key"], "vocab_size": meta["vocab_size"], "dtype": meta["dtype"],
               "eos_id": meta["eos_id"], "format": FORMAT, "version": FORMAT_VERSION,
               "sources": [{k: s[k] for k in ("name", "lang", "role")} for s in meta["sources"]]},
    )


def _open_store(store: str | ArtifactStore | None) -> ArtifactStore | None:
    if store is None or not isinstance(store, str):
        return store
    from vinasmol_core.store import ArtifactStore

    return ArtifactStore(store)


def _publish(store: ArtifactStore, meta: dict[str, Any], out_dir: Path, ref: str | None) -> str:
    key_ref = KEY_REF_PREFIX + meta["key"]
    published = store.publish(dataset_manifest(meta), src_dir=out_dir, ref=key_ref)
    digest = published.digest
    if ref:
        store.set_ref(ref, digest)
    return digest


def _validate_inputs(sources: list[SourceSpec], settings: PrepareSettings) -> None:
    if not sources:
        raise ConfigError("no sources: give at least one --source NAME:LANG=PATH")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"source names must be unique; repeated: {', '.join(dupes)}")
    if not 0.0 <= settings.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {settings.val_fraction}")
    if not 0.0 < settings.near_dedup_threshold <= 1.0:
        raise ConfigError(f"near_dedup_threshold must be in (0, 1], got {settings.near_dedup_threshold}")
    if settings.shard_tokens < 1024:
        raise ConfigError(f"shard_tokens must be at least 1024, got {settings.shard_tokens}")


_FLAGGED_PATHS: Any = {lang: {"flagged_words": {"path"}} for lang in ("vi", "en", "code", "any")}


def flagged_word_lists(settings: PrepareSettings) -> dict[str, frozenset[str]]:
    """The flagged-word list of each language whose flagged_words filter is on (ConfigError if unreadable)."""
    cur = settings.curation
    if cur is None or not cur.enabled:
        return {}
    return {lang: load_flagged_words(cur.for_lang(lang).flagged_words, f"curation.{lang}.flagged_words")
            for lang in ("vi", "en", "code", "any") if cur.for_lang(lang).flagged_words.enabled}


@dataclass(frozen=True)
class _Job:
    """One build's resolved inputs, settings and callbacks."""

    sources: list[SourceSpec]
    files: dict[str, list[ResolvedFile]]
    digests: dict[str, str]
    tok_path: Path
    tok_digest: str
    key: str
    settings: PrepareSettings
    flagged_words: dict[str, frozenset[str]]
    on_source_done: Callable[[str, SourceStats], None] | None
    on_progress: Callable[[str, SourceStats], None] | None


def prepare_dataset(
    sources: list[SourceSpec],
    tokenizer_dir: Path,
    out_dir: Path,
    settings: PrepareSettings | None = None,
    *,
    store: str | ArtifactStore | None = None,
    ref: str | None = None,
    on_source_done: Callable[[str, SourceStats], None] | None = None,
    on_progress: Callable[[str, SourceStats], None] | None = None,
    rebuild: bool = False,
) -> DatasetInfo:
    """Prepare `sources` with the tokenizer in `tokenizer_dir` into `out_dir` as `settings` say (and
    publish the result to `store` when given, under the ref `datasets/by-key/<key>` and `ref`).
    `on_progress` gets the running counts of the source being read every few seconds, `on_source_done`
    its final ones.

    Returns early, doing no work, when `out_dir` or the store already holds this exact build (the
    store's copy only while it has every blob its manifest names), unless `rebuild` (a forced step)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    job = _resolve(sources, tokenizer_dir, settings or PrepareSettings(), on_source_done, on_progress)
    st = _open_store(store)
    existing = None if rebuild else _existing_build(job.key, out_dir, st, ref, t0)
    if existing is not None:
        return existing
    if rebuild:
        _check_out_dir(out_dir, _read_meta(out_dir))
    meta = _build_into(job, out_dir)
    digest = _publish(st, meta, out_dir, ref) if st is not None else None
    return _info_from_meta(meta, out_dir, reused=False, manifest_digest=digest,
                           seconds=time.perf_counter() - t0)


def _resolve(sources: list[SourceSpec], tokenizer_dir: Path, settings: PrepareSettings,
             on_source_done: Callable[[str, SourceStats], None] | None,
             on_progress: Callable[[str, SourceStats], None] | None) -> _Job:
    """Check the settings, find the files and digest the sources and the tokenizer."""
    _validate_inputs(sources, settings)
    tok_path = tokenizer_file(tokenizer_dir)
    tok_digest = tokenizer_digest(tokenizer_dir)
    files = {s.name: resolve_files(s) if s.paths else [] for s in sources}
    flagged = flagged_word_lists(settings)
    digests = {s.name: source_digest(s, files[s.name]) for s in sources}
    key = dataset_key(sources, digests, settings, tok_digest, flagged)
    return _Job(sources=sources, files=files, digests=digests, tok_path=tok_path, tok_digest=tok_digest,
                key=key, settings=settings, flagged_words=flagged, on_source_done=on_source_done,
                on_progress=on_progress)


def _existing_build(key: str, out_dir: Path, st: ArtifactStore | None, ref: str | None,
                    t0: float) -> DatasetInfo | None:
    """The build `key` when `out_dir` or the store already holds it (None: build it). Raises when
    `out_dir` holds something else."""
    existing = _read_meta(out_dir)
    if existing is not None and existing.get("key") == key:
        digest = _publish(st, existing, out_dir, ref) if st is not None else None
        log.info("dataset %s already in %s", key[:12], out_dir)
        return _info_from_meta(existing, out_dir, reused=True, manifest_digest=digest,
                               seconds=time.perf_counter() - t0)
    if st is not None and st.exists(KEY_REF_PREFIX + key) and _complete(st, KEY_REF_PREFIX + key):
        manifest = st.get_manifest(KEY_REF_PREFIX + key)
        if ref:
            st.set_ref(ref, manifest.digest)
        meta = {"key": key, "tokenizer_digest": manifest.tokenizer_digest,  # type: ignore[attr-defined]
                "vocab_size": manifest.extra["vocab_size"], "dtype": manifest.extra["dtype"],
                "token_counts": manifest.token_counts,  # type: ignore[attr-defined]
                "sources": [{"name": n, "stats": s} for n, s in manifest.stats.items()]}  # type: ignore[attr-defined]
        return _info_from_meta(meta, None, reused=True, manifest_digest=manifest.digest,
                               seconds=time.perf_counter() - t0)
    _check_out_dir(out_dir, existing)
    return None


def _complete(st: ArtifactStore, ref: str) -> bool:
    """Whether the store holds every blob of the build `ref` names (a repaired store may have lost
    some: the build is then made and published again)."""
    missing = st.missing_files(ref)
    if missing:
        log.warning("dataset %s: %d file(s) missing from the store (%s); building it again",
                    ref.removeprefix(KEY_REF_PREFIX)[:12], len(missing), missing[0])
    return not missing


def _check_out_dir(out_dir: Path, existing: dict[str, Any] | None) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (existing is None and any(out_dir.iterdir()))):
        raise VinaSmolError(f"output folder {out_dir} exists and is not a prepared dataset; "
                            "choose an empty or new folder")


def _build_into(job: _Job, out_dir: Path) -> dict[str, Any]:
    """Build in a temporary sibling folder (again without the fast path when it disagreed with the
    tokenizer), then move it to `out_dir`; returns dataset.json's content."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        workers = job.settings.workers
        n_workers = auto_workers(job.files, job.sources) if workers is None else max(0, workers)
        try:
            with WorkerPool(n_workers) as pool:
                meta = _build(job, tmp, pool, fast=job.settings.use_fast_path)
        except _FastPathMismatch as exc:
            log.warning("fast tokenizer path disagreed with the tokenizer (%s); rebuilding without it", exc)
            shutil.rmtree(tmp)
            tmp.mkdir()
            with WorkerPool(n_workers) as pool:
                meta = _build(job, tmp, pool, fast=False)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


class _FastPathMismatch(Exception):
    """The fast tokenizer path disagreed with the real tokenizer: rebuild without it."""


@dataclass
class _SourceEnd:
    """Marks the end of a source's batches in the (ordered) stream of results."""

    index: int
    counters: ReadCounters


def _sample_mismatch(tokenizer: Any, item: BatchResult) -> str | None:
    """The first sample whose fast-path ids differ from the tokenizer's own (None when all agree)."""
    if not item.samples:
        return None
    encodings = tokenizer.encode_batch([text for text, _ in item.samples], add_special_tokens=False)
    for (text, ids), encoding in zip(item.samples, encodings, strict=True):
        if ids.tolist() != encoding.ids:
            return repr(text[:80])
    return None


def _batches(sources: list[SourceSpec], files: dict[str, list[ResolvedFile]], skip_bad_lines: bool,
             batch_chars: int, kept: dict[str, int]) -> Iterator[Batch | _SourceEnd]:
    """Every source's batches in order. A source with a token budget is read until `kept` (its training
    tokens written so far, kept up to date by the consumer) meets it."""
    for index, spec in enumerate(sources):
        counters = ReadCounters()
        read = spec
        if spec.max_tokens is not None and spec.max_bytes is not None:
            read = spec.model_copy(update={"max_bytes": spec.max_bytes * READ_ON_FACTOR})
        for n, batch in enumerate(iter_batches(read, files[spec.name], skip_bad_lines=skip_bad_lines,
                                               counters=counters, batch_chars=batch_chars)):
            if spec.max_tokens is not None and kept.get(spec.name, 0) >= spec.max_tokens:
                break
            batch.verify = 8 if n < 2 else (1 if n % 16 == 0 else 0)
            yield batch
        yield _SourceEnd(index, counters)


def _build(job: _Job, root: Path, pool: WorkerPool, *, fast: bool) -> dict[str, Any]:
    """Read, process and write every source into `root`; returns (and writes) dataset.json's content."""
    from tokenizers import Tokenizer

    settings = job.settings
    tokenizer = Tokenizer.from_file(str(job.tok_path))
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise VinaSmolError(f"tokenizer {job.tok_path} has no {EOS_TOKEN} token to separate documents")
    vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    dtype = dtype_for_vocab(vocab_size)
    tables = BPETables.build(tokenizer, job.tok_path) if fast else None
    cfg = WorkerConfig(tokenizer_path=str(job.tok_path), eos_id=int(eos), dtype=dtype.name,
                       cleaning=settings.cleaning, val_fraction=settings.val_fraction, dedup=settings.dedup,
                       near_dedup=settings.near_dedup, fast_tables=tables, curation=settings.curation,
                       flagged_words=job.flagged_words)
    pool.configure(cfg)
    entries = _write_sources(job, root, pool, tokenizer, dtype, _Dedup(settings, cfg.num_perm))
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": job.key,
        "tokenizer_digest": job.tok_digest,
        "vocab_size": vocab_size,
        "eos_id": int(eos),
        "dtype": dtype.name,
        "val_fraction": settings.val_fraction,
        "dedup": settings.dedup,
        "near_dedup": settings.near_dedup,
        "near_dedup_threshold": settings.near_dedup_threshold if settings.near_dedup else None,
        "cleaning": settings.cleaning.model_dump(mode="json"),
        "curation": settings.curation.model_dump(mode="json") if settings.curation else None,
        "token_counts": _token_counts(entries),
        "shards": [s["path"] for e in entries for sp in SPLITS for s in e["splits"][sp]["shards"]],
        "sources": entries,
    }
    (root / DATASET_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _write_sources(job: _Job, root: Path, pool: WorkerPool, tokenizer: Any, dtype: np.dtype[Any],
                   dedup: _Dedup) -> list[dict[str, Any]]:
    """Take the processed batches in order, check their samples, deduplicate them and write each source's
    shards; returns the sources' dataset.json entries."""
    sources, shard_tokens = job.sources, job.settings.shard_tokens
    entries: list[dict[str, Any]] = []
    curated = job.settings.curation is not None and job.settings.curation.enabled
    out = _SourceOut(root, sources[0], dtype, shard_tokens, curated)
    next_progress = time.monotonic() + PROGRESS_SECONDS
    kept: dict[str, int] = {}
    for item in pool.results(_batches(sources, job.files, job.settings.skip_bad_lines,
                                      job.settings.batch_chars, kept)):
        if isinstance(item, _SourceEnd):
            name = sources[item.index].name
            entries.append(out.close(item.counters, job.digests[name], job.files[name]))
            if job.on_source_done is not None:
                job.on_source_done(name, out.stats)
            if item.index + 1 < len(sources):
                out = _SourceOut(root, sources[item.index + 1], dtype, shard_tokens, curated)
            continue
        mismatch = _sample_mismatch(tokenizer, item)
        if mismatch is not None:
            raise _FastPathMismatch(mismatch)
        out.stats.docs_read += item.docs_read
        out.stats.bytes_read += item.bytes_read
        if job.on_progress is not None and time.monotonic() >= next_progress:
            job.on_progress(out.spec.name, out.stats)
            next_progress = time.monotonic() + PROGRESS_SECONDS
        out.add(item, dedup)
        kept[out.spec.name] = out.writers["train"].total_tokens
    return entries


class _Dedup:
    """Exact (a set of document hashes) and near (MinHash LSH) deduplication across all sources, in
    input order: the first copy of a document is the one kept."""

    def __init__(self, settings: PrepareSettings, num_perm: int) -> None:
        self.exact = settings.dedup
        self.seen: set[int] = set()
        self.lsh: Any = None
        self.n_lsh = 0
        if settings.near_dedup:
            from datasketch import LeanMinHash, MinHashLSH

            self.lean_minhash = LeanMinHash
            self.lsh = MinHashLSH(threshold=settings.near_dedup_threshold, num_perm=num_perm)
            self.scheme = minhash_scheme()

    def keep(self, item: BatchResult, stats: SourceStats) -> np.ndarray:
        """Which of the batch's documents to keep (the duplicates are counted in `stats`)."""
        n = item.lengths.size
        keep = np.ones(n, dtype=bool)
        if self.exact:
            for j, h in enumerate(item.hashes.tolist()):
                if h in self.seen:
                    keep[j] = False
                    stats.exact_duplicates += 1
                else:
                    self.seen.add(h)
        if self.lsh is not None and item.minhashes is not None:
            for j in range(n):
                if not keep[j]:
                    continue
                sig = self.lean_minhash(seed=1, hashvalues=item.minhashes[j], **self.scheme)
                if self.lsh.query(sig):
                    keep[j] = False
                    stats.near_duplicates += 1
                else:
                    self.lsh.insert(self.n_lsh, sig, check_duplication=False)
                    self.n_lsh += 1
        return keep


class _SourceOut:
    """One source's shard writers (train and val), running stats and bad-line examples."""

    def __init__(self, root: Path, spec: SourceSpec, dtype: np.dtype[Any], shard_tokens: int,
                 curated: bool) -> None:
        self.spec = spec
        self.writers = {sp: ShardWriter(root, f"{sp}/{spec.name}", dtype, shard_tokens) for sp in SPLITS}
        self.stats = SourceStats(removed=dict.fromkeys(FILTERS + (QUALITY_FILTERS if curated else ()), 0),
                                 planned_tokens=spec.max_tokens)
        self.bad_examples: list[str] = []

    def add(self, item: BatchResult, dedup: _Dedup) -> None:
        """Count a batch's bad lines and removed documents; write the documents that are not duplicates."""
        stats = self.stats
        stats.bad_lines_skipped += item.bad_lines
        self.bad_examples.extend(item.bad_examples)
        for k, v in item.removed.items():
            stats.removed[k] = stats.removed.get(k, 0) + v
        for k, f in item.filters.items():
            stats.filters.setdefault(k, FilterStats()).merge(f)
        budget = self.spec.max_tokens
        if item.lengths.size == 0 or (budget is not None and self.writers["train"].total_tokens >= budget):
            return
        keep = dedup.keep(item, stats)
        if budget is not None:
            keep = _within_budget(keep, item, budget - self.writers["train"].total_tokens)
        for sp, docs in (("train", keep & ~item.is_val), ("val", keep & item.is_val)):
            if not docs.any():
                continue
            if docs.all():
                self.writers[sp].add(item.tokens, item.lengths)
            else:
                self.writers[sp].add(item.tokens[np.repeat(docs, item.lengths)], item.lengths[docs])

    def close(self, counters: ReadCounters, digest: str, files: list[ResolvedFile]) -> dict[str, Any]:
        """Close the shards and check the source kept documents; returns its dataset.json entry."""
        spec, stats = self.spec, self.stats
        stats.bad_lines_skipped += counters.bad_lines_skipped
        self.bad_examples.extend(counters.bad_line_examples)
        split_entries = {}
        for sp in SPLITS:
            shards = self.writers[sp].close()
            split_entries[sp] = {"tokens": self.writers[sp].total_tokens, "docs": self.writers[sp].total_docs,
                                 "shards": shards}
        stats.train_tokens = split_entries["train"]["tokens"]
        stats.val_tokens = split_entries["val"]["tokens"]
        stats.train_docs = split_entries["train"]["docs"]
        stats.val_docs = split_entries["val"]["docs"]
        _check_source_nonempty(spec, stats, files)
        if stats.planned_tokens is not None and stats.train_tokens < stats.planned_tokens:
            log.warning("source %s: %s training tokens kept of the %s planned (read %.1f MB, %d documents)",
                        spec.name, f"{stats.train_tokens:,}", f"{stats.planned_tokens:,}",
                        stats.bytes_read / 1e6, stats.docs_read)
        entry = {"name": spec.name, "lang": spec.lang, "role": spec.role, "text_field": spec.text_field,
                 "digest": digest, "spec": spec.model_dump(mode="json"),
                 "stats": stats.model_dump(mode="json"), "splits": split_entries}
        if self.bad_examples:
            entry["bad_line_examples"] = self.bad_examples[:5]
        return entry


def _within_budget(keep: np.ndarray, item: BatchResult, left: int) -> np.ndarray:
    """`keep` without the documents after the training document that brings the kept training tokens
    to `left` (in input order, validation documents cut at the same place)."""
    train = np.where(keep & ~item.is_val, item.lengths, 0)
    reached = np.flatnonzero(np.cumsum(train) >= left)
    if reached.size == 0:
        return keep
    out = keep.copy()
    out[reached[0] + 1 :] = False
    return out


def _check_source_nonempty(spec: SourceSpec, stats: SourceStats, files: list[ResolvedFile]) -> None:
    where = spec.hf_dataset or ", ".join(f.display for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if stats.docs_read == 0:
        extra = f" ({stats.bad_lines_skipped} bad lines skipped)" if stats.bad_lines_skipped else ""
        raise VinaSmolError(f"source {spec.name!r} is empty: no documents in {where}{extra}")
    if stats.train_docs + stats.val_docs == 0:
        removed = ", ".join(f"{k}: {v}" for k, v in stats.removed.items() if v)
        raise VinaSmolError(
            f"source {spec.name!r}: all {stats.docs_read} documents were removed "
            f"({removed or 'none by cleaning'}; exact duplicates: {stats.exact_duplicates}; "
            f"near duplicates: {stats.near_duplicates})"
        )


def _token_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Train tokens per language (`vi`), per role (`main`, `annealing`) and in all (`total`); the same
    for validation under `val/...`."""
    counts: dict[str, int] = {}
    for prefix, split in (("", "train"), ("val/", "val")):
        counts[f"{prefix}total"] = 0
        for e in entries:
            n = int(e["splits"][split]["tokens"])
            for k in (e["lang"], e["role"], "total"):
                counts[f"{prefix}{k}"] = counts.get(f"{prefix}{k}", 0) + n
    return counts
