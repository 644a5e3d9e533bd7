"""Build a dataset artifact: read, clean, deduplicate, split, tokenize and pack every source.

Streaming throughout. The main process reads the sources and hands batches of raw lines to worker
processes (one per core, spawned while it reads the tokenizer), which parse, clean, hash and
tokenize them (see worker.py). It takes their results in order, drops duplicates, checks sampled
documents against the tokenizer and writes token shards as they fill, so peak memory does not grow
with the corpus (exact deduplication keeps 8 bytes plus set overhead per document; near-duplicate
detection keeps its LSH index in memory). Small local inputs are processed in-process.

The result folder (see shards.py for the layout) is built in a temporary sibling folder and
renamed into place only when complete. Its key, a digest of the source digests, the cleaning,
split and dedup settings and the tokenizer digest, lets a second call with unchanged inputs
return at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vinasmol_core.data.clean import FILTERS
from vinasmol_core.data.fastbpe import BPETables
from vinasmol_core.data.readers import ReadCounters, ResolvedFile, iter_batches, resolve_files, source_digest
from vinasmol_core.data.shards import ShardWriter, dtype_for_vocab
from vinasmol_core.data.spec import CleaningSpec, DatasetInfo, SourceSpec, SourceStats
from vinasmol_core.data.tokcheck import EOS_TOKEN, tokenizer_digest, tokenizer_file
from vinasmol_core.data.worker import (
    Batch,
    BatchResult,
    WorkerConfig,
    init_worker,
    local_state,
    minhash_scheme,
    process_batch,
    process_in_worker,
    split_is_val,
    started,
)
from vinasmol_core.errors import ConfigError, VinaSmolError

if TYPE_CHECKING:
    from vinasmol_core.manifests import DatasetManifest
    from vinasmol_core.store import ArtifactStore

log = logging.getLogger(__name__)

FORMAT = "vinasmol-token-shards"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
SPLITS = ("train", "val")
KEY_REF_PREFIX = "datasets/by-key/"
PROGRESS_SECONDS = 5.0  # at most one on_progress call per source this often


def split_of(source: str, doc_id: str, val_fraction: float) -> str:
    """'val' or 'train', from a stable hash of (source name, document id)."""
    return "val" if split_is_val(source, doc_id, val_fraction) else "train"


def dataset_key(
    sources: list[SourceSpec],
    source_digests: dict[str, str],
    *,
    cleaning: CleaningSpec,
    val_fraction: float,
    dedup: bool,
    near_dedup: bool,
    near_dedup_threshold: float,
    tokenizer_digest_: str,
    shard_tokens: int,
) -> str:
    """A deterministic key for a build: same inputs and settings, same key."""
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        # where the files are is not part of the key: their content (the digest) is
        "sources": [s.model_dump(mode="json", exclude={"paths", "hf_data_files"})
                    | {"digest": source_digests[s.name]} for s in sources],
        "cleaning": cleaning.model_dump(mode="json"),
        "val_fraction": val_fraction,
        "dedup": dedup,
        "near_dedup": near_dedup,
        "near_dedup_threshold": near_dedup_threshold if near_dedup else None,
        "tokenizer": tokenizer_digest_,
        "shard_tokens": shard_tokens,
    }
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
    from vinasmol_core.manifests import DatasetManifest

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


def _validate_inputs(sources: list[SourceSpec], val_fraction: float, near_dedup_threshold: float,
                     shard_tokens: int) -> None:
    if not sources:
        raise ConfigError("no sources: give at least one --source NAME:LANG=PATH")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"source names must be unique; repeated: {', '.join(dupes)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 < near_dedup_threshold <= 1.0:
        raise ConfigError(f"near_dedup_threshold must be in (0, 1], got {near_dedup_threshold}")
    if shard_tokens < 1024:
        raise ConfigError(f"shard_tokens must be at least 1024, got {shard_tokens}")


def prepare_dataset(
    sources: list[SourceSpec],
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    cleaning: CleaningSpec | None = None,
    val_fraction: float = 0.01,
    dedup: bool = True,
    near_dedup: bool = False,
    near_dedup_threshold: float = 0.8,
    skip_bad_lines: bool = False,
    store: str | ArtifactStore | None = None,
    ref: str | None = None,
    shard_tokens: int = 1 << 25,
    batch_chars: int = 1 << 21,
    workers: int | None = None,
    use_fast_path: bool = True,
    on_source_done: Callable[[str, SourceStats], None] | None = None,
    on_progress: Callable[[str, SourceStats], None] | None = None,
) -> DatasetInfo:
    """Prepare `sources` with the tokenizer in `tokenizer_dir` into `out_dir` (and publish the result
    to `store` when given, under the ref `datasets/by-key/<key>` and `ref`). `on_progress` gets the
    running counts of the source being read every few seconds, `on_source_done` its final ones.

    Returns early, doing no work, when `out_dir` or the store already holds this exact build."""
    t0 = time.perf_counter()
    cleaning = cleaning or CleaningSpec()
    out_dir = Path(out_dir)
    _validate_inputs(sources, val_fraction, near_dedup_threshold, shard_tokens)
    tok_path = tokenizer_file(tokenizer_dir)
    tok_digest = tokenizer_digest(tokenizer_dir)
    files = {s.name: resolve_files(s) if s.paths else [] for s in sources}
    digests = {s.name: source_digest(s, files[s.name]) for s in sources}
    key = dataset_key(sources, digests, cleaning=cleaning, val_fraction=val_fraction, dedup=dedup,
                      near_dedup=near_dedup, near_dedup_threshold=near_dedup_threshold,
                      tokenizer_digest_=tok_digest, shard_tokens=shard_tokens)
    st = _open_store(store)

    existing = _read_meta(out_dir)
    if existing is not None and existing.get("key") == key:
        digest = _publish(st, existing, out_dir, ref) if st is not None else None
        log.info("dataset %s already in %s", key[:12], out_dir)
        return _info_from_meta(existing, out_dir, reused=True, manifest_digest=digest,
                               seconds=time.perf_counter() - t0)
    if st is not None and st.exists(KEY_REF_PREFIX + key):
        manifest = st.get_manifest(KEY_REF_PREFIX + key)
        if ref:
            st.set_ref(ref, manifest.digest)
        meta = {"key": key, "tokenizer_digest": manifest.tokenizer_digest,  # type: ignore[attr-defined]
                "vocab_size": manifest.extra["vocab_size"], "dtype": manifest.extra["dtype"],
                "token_counts": manifest.token_counts,  # type: ignore[attr-defined]
                "sources": [{"name": n, "stats": s} for n, s in manifest.stats.items()]}  # type: ignore[attr-defined]
        return _info_from_meta(meta, None, reused=True, manifest_digest=manifest.digest,
                               seconds=time.perf_counter() - t0)
    if out_dir.exists() and (not out_dir.is_dir() or (existing is None and any(out_dir.iterdir()))):
        raise VinaSmolError(f"output folder {out_dir} exists and is not a prepared dataset; "
                            "choose an empty or new folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        n_workers = _auto_workers(files, sources) if workers is None else max(0, workers)
        build_args: dict[str, Any] = dict(
            key=key, cleaning=cleaning, val_fraction=val_fraction, dedup=dedup, near_dedup=near_dedup,
            near_dedup_threshold=near_dedup_threshold, skip_bad_lines=skip_bad_lines,
            shard_tokens=shard_tokens, batch_chars=batch_chars, on_source_done=on_source_done,
            on_progress=on_progress)
        try:
            with _Workers(n_workers) as pool:
                meta = _build(sources, files, digests, tok_path, tok_digest, tmp, pool=pool,
                              use_fast_path=use_fast_path, **build_args)
        except _FastPathMismatch as exc:
            log.warning("fast tokenizer path disagreed with the tokenizer (%s); rebuilding without it", exc)
            shutil.rmtree(tmp)
            tmp.mkdir()
            with _Workers(n_workers) as pool:
                meta = _build(sources, files, digests, tok_path, tok_digest, tmp, pool=pool,
                              use_fast_path=False, **build_args)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digest = _publish(st, meta, out_dir, ref) if st is not None else None
    return _info_from_meta(meta, out_dir, reused=False, manifest_digest=digest,
                           seconds=time.perf_counter() - t0)


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


def _auto_workers(files: dict[str, list[ResolvedFile]], sources: list[SourceSpec]) -> int:
    """Worker processes: one per usable core, none for small local inputs (process start-up dominates)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    if cores < 2:
        return 0
    if all(s.paths for s in sources) and all(f.local for fs in files.values() for f in fs):
        size = sum(os.path.getsize(f.url) * (4 if f.compression else 1) for fs in files.values() for f in fs)
        if size < (16 << 20):
            return 0
    return min(cores, 8)


class _Workers:
    """Where batches are processed: in this process, or in `n` spawned worker processes with a bounded
    number of batches in flight. The processes start at once, so that their imports overlap the main
    process reading the tokenizer; `configure` then sends each of them the WorkerConfig. The config
    (about 1.5 MB with the fast path's tables) goes through a file: the queue carries only its path,
    so a put never waits on a worker, even one that died."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.state: Any = None
        self.pool: ProcessPoolExecutor | None = None
        self.config_file: Path | None = None  # set once the workers have been sent their config
        if n > 0:
            ctx = multiprocessing.get_context("spawn")
            self.setup = ctx.SimpleQueue()
            self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker,
                                            initargs=(self.setup,))
            for _ in range(n):
                self.pool.submit(started)

    def configure(self, cfg: WorkerConfig) -> None:
        if self.pool is None:
            self.state = local_state(cfg)
        else:
            fd, name = tempfile.mkstemp(prefix="vinasmol-data-worker-", suffix=".pickle")
            self.config_file = Path(name)
            with os.fdopen(fd, "wb") as f:
                pickle.dump(cfg, f, protocol=pickle.HIGHEST_PROTOCOL)
            for _ in range(self.n):
                self.setup.put(name)

    def results(self, items: Iterator[Batch | _SourceEnd]) -> Iterator[BatchResult | _SourceEnd]:
        """Results in input order."""
        if self.pool is None:
            for item in items:
                yield item if isinstance(item, _SourceEnd) else process_batch(item, self.state)
            return
        pending: deque[Future[BatchResult] | _SourceEnd] = deque()
        try:
            for item in items:
                pending.append(item if isinstance(item, _SourceEnd)
                               else self.pool.submit(process_in_worker, item))
                while sum(isinstance(p, Future) for p in pending) > 2 * self.n:
                    head = pending.popleft()
                    yield head if isinstance(head, _SourceEnd) else head.result()
            while pending:
                head = pending.popleft()
                yield head if isinstance(head, _SourceEnd) else head.result()
        except BrokenProcessPool as exc:
            raise VinaSmolError(f"a data worker process died ({exc}); out of memory? "
                                "try fewer --workers") from exc

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.pool is None:
            return
        if self.config_file is None:  # the workers wait for a config: tell them there is none
            for _ in range(self.n):
                self.setup.put(None)
        # After a success nothing is left to wait for but the workers' interpreter teardown (about
        # 0.2 s): they exit in the background. After a failure, wait until no batch is running.
        self.pool.shutdown(wait=exc_type is not None, cancel_futures=True)
        if self.config_file is not None:  # a worker that had not read it yet starts without work
            self.config_file.unlink(missing_ok=True)


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
             batch_chars: int) -> Iterator[Batch | _SourceEnd]:
    for index, spec in enumerate(sources):
        counters = ReadCounters()
        for n, batch in enumerate(iter_batches(spec, files[spec.name], skip_bad_lines=skip_bad_lines,
                                               counters=counters, batch_chars=batch_chars)):
            batch.verify = 8 if n < 2 else (1 if n % 16 == 0 else 0)
            yield batch
        yield _SourceEnd(index, counters)


def _build(
    sources: list[SourceSpec],
    files: dict[str, list[ResolvedFile]],
    digests: dict[str, str],
    tok_path: Path,
    tok_digest: str,
    root: Path,
    *,
    key: str,
    cleaning: CleaningSpec,
    val_fraction: float,
    dedup: bool,
    near_dedup: bool,
    near_dedup_threshold: float,
    skip_bad_lines: bool,
    shard_tokens: int,
    batch_chars: int,
    pool: _Workers,
    use_fast_path: bool,
    on_source_done: Callable[[str, SourceStats], None] | None,
    on_progress: Callable[[str, SourceStats], None] | None,
) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_path))
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise VinaSmolError(f"tokenizer {tok_path} has no {EOS_TOKEN} token to separate documents")
    vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    dtype = dtype_for_vocab(vocab_size)
    tables = BPETables.build(tokenizer, tok_path) if use_fast_path else None
    cfg = WorkerConfig(tokenizer_path=str(tok_path), eos_id=int(eos), dtype=dtype.name, cleaning=cleaning,
                       val_fraction=val_fraction, dedup=dedup, near_dedup=near_dedup, fast_tables=tables)
    pool.configure(cfg)
    seen: set[int] = set()
    lsh = None
    if near_dedup:
        from datasketch import LeanMinHash, MinHashLSH

        lsh = MinHashLSH(threshold=near_dedup_threshold, num_perm=cfg.num_perm)
        scheme = minhash_scheme()
    n_lsh = 0
    entries: list[dict[str, Any]] = []

    def new_state(spec: SourceSpec) -> tuple[dict[str, ShardWriter], SourceStats]:
        writers = {sp: ShardWriter(root, f"{sp}/{spec.name}", dtype, shard_tokens) for sp in SPLITS}
        return writers, SourceStats(removed=dict.fromkeys(FILTERS, 0))

    current = 0
    next_progress = time.monotonic() + PROGRESS_SECONDS
    writers, stats = new_state(sources[0])
    bad_examples: list[str] = []
    for item in pool.results(_batches(sources, files, skip_bad_lines, batch_chars)):
        if isinstance(item, _SourceEnd):
            spec = sources[item.index]
            stats.bad_lines_skipped += item.counters.bad_lines_skipped
            bad_examples.extend(item.counters.bad_line_examples)
            split_entries = {}
            for sp in SPLITS:
                shards = writers[sp].close()
                split_entries[sp] = {"tokens": writers[sp].total_tokens, "docs": writers[sp].total_docs,
                                     "shards": shards}
            stats.train_tokens = split_entries["train"]["tokens"]
            stats.val_tokens = split_entries["val"]["tokens"]
            stats.train_docs = split_entries["train"]["docs"]
            stats.val_docs = split_entries["val"]["docs"]
            _check_source_nonempty(spec, stats, files[spec.name])
            entry = {"name": spec.name, "lang": spec.lang, "role": spec.role, "text_field": spec.text_field,
                     "digest": digests[spec.name], "spec": spec.model_dump(mode="json"),
                     "stats": stats.model_dump(mode="json"), "splits": split_entries}
            if bad_examples:
                entry["bad_line_examples"] = bad_examples[:5]
            entries.append(entry)
            if on_source_done is not None:
                on_source_done(spec.name, stats)
            current = item.index + 1
            bad_examples = []
            if current < len(sources):
                writers, stats = new_state(sources[current])
            continue
        mismatch = _sample_mismatch(tokenizer, item)
        if mismatch is not None:
            raise _FastPathMismatch(mismatch)
        stats.docs_read += item.docs_read
        stats.bytes_read += item.bytes_read
        if on_progress is not None and time.monotonic() >= next_progress:
            on_progress(sources[current].name, stats)
            next_progress = time.monotonic() + PROGRESS_SECONDS
        stats.bad_lines_skipped += item.bad_lines
        bad_examples.extend(item.bad_examples)
        for k, v in item.removed.items():
            stats.removed[k] = stats.removed.get(k, 0) + v
        n = item.lengths.size
        if n == 0:
            continue
        keep = np.ones(n, dtype=bool)
        if dedup:
            for j, h in enumerate(item.hashes.tolist()):
                if h in seen:
                    keep[j] = False
                    stats.exact_duplicates += 1
                else:
                    seen.add(h)
        if lsh is not None and item.minhashes is not None:
            for j in range(n):
                if not keep[j]:
                    continue
                sig = LeanMinHash(seed=1, hashvalues=item.minhashes[j], **scheme)
                if lsh.query(sig):
                    keep[j] = False
                    stats.near_duplicates += 1
                else:
                    lsh.insert(n_lsh, sig, check_duplication=False)
                    n_lsh += 1
        for sp, docs in (("train", keep & ~item.is_val), ("val", keep & item.is_val)):
            if not docs.any():
                continue
            if docs.all():
                writers[sp].add(item.tokens, item.lengths)
            else:
                writers[sp].add(item.tokens[np.repeat(docs, item.lengths)], item.lengths[docs])
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "tokenizer_digest": tok_digest,
        "vocab_size": vocab_size,
        "eos_id": int(eos),
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "dedup": dedup,
        "near_dedup": near_dedup,
        "near_dedup_threshold": near_dedup_threshold if near_dedup else None,
        "cleaning": cleaning.model_dump(mode="json"),
        "token_counts": _token_counts(entries),
        "shards": [s["path"] for e in entries for sp in SPLITS for s in e["splits"][sp]["shards"]],
        "sources": entries,
    }
    (root / DATASET_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta

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
