"""Build a dataset artifact: read, clean, deduplicate, split, tokenize and pack every source.

Streaming throughout: one batch of text is cleaned while the previous one is tokenized (the
tokenizer's Rust threads use every core and release the GIL), and token shards are written as
they fill, so peak memory does not grow with the corpus (exact deduplication keeps 8 bytes plus
set overhead per document; near-duplicate detection keeps its LSH index in memory).

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
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vinasmol_core.data.clean import FILTERS, clean_document, dedup_key
from vinasmol_core.data.readers import (
    ReadCounters,
    ResolvedFile,
    iter_documents,
    resolve_files,
    source_digest,
)
from vinasmol_core.data.shards import ShardWriter, dtype_for_vocab
from vinasmol_core.data.spec import CleaningSpec, DatasetInfo, SourceSpec, SourceStats
from vinasmol_core.data.tokcheck import EOS_TOKEN, tokenizer_digest, tokenizer_file
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


def split_of(source: str, doc_id: str, val_fraction: float) -> str:
    """'val' or 'train', from a stable hash of (source name, document id)."""
    if val_fraction <= 0.0:
        return "train"
    h = hashlib.blake2b(f"{source}\0{doc_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "big") < val_fraction * 2.0**64 else "train"


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
        "sources": [s.model_dump(mode="json") | {"digest": source_digests[s.name]} for s in sources],
        "cleaning": cleaning.model_dump(mode="json"),
        "val_fraction": val_fraction,
        "dedup": dedup,
        "near_dedup": near_dedup,
        "near_dedup_threshold": near_dedup_threshold if near_dedup else None,
        "tokenizer": tokenizer_digest_,
        "shard_tokens": shard_tokens,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _NearDeduper:
    """MinHash LSH over lower-cased word n-grams (datasketch); the first document of a cluster wins."""

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.num_perm = num_perm
        self.ngram = ngram
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._permutations = MinHash(num_perm=num_perm, seed=1).permutations
        self._n = 0

    def is_duplicate(self, text: str) -> bool:
        words = text.lower().split()
        n = self.ngram
        grams = {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        m = self._minhash(num_perm=self.num_perm, permutations=self._permutations)
        m.update_batch(list(grams))
        if self.lsh.query(m):
            return True
        self.lsh.insert(self._n, m, check_duplication=False)
        self._n += 1
        return False


class _Encoder:
    """Tokenizes batches of documents and appends them, each followed by <|endoftext|>, to writers."""

    def __init__(self, tokenizer_path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise VinaSmolError(f"tokenizer {tokenizer_path} has no {EOS_TOKEN} token")
        self.eos_id = int(eos)
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        self.dtype = dtype_for_vocab(self.vocab_size)
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(concatenated ids with eos after every document, per-document lengths including eos)."""
        encodings = self._encode(texts, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        total = int(lengths.sum())
        eos = [self.eos_id]
        flat = np.fromiter(chain.from_iterable(chain.from_iterable((x, eos) for x in ids)),
                           dtype=self.dtype, count=total)
        return flat, lengths


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    """Cut a very long document at line starts (a newline followed by a non-space character), where
    byte-level BPE pre-tokenization splits anyway, so batches stay bounded in memory."""
    start = 0
    while len(text) - start > max_chars:
        cut = text.find("\n", start + max_chars // 2, start + max_chars)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1, start + max_chars)
        if cut == -1:
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:]


class _Batch:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.splits: list[str] = []
        self.pieces: list[int] = []  # how many consecutive texts make each document
        self.chars = 0


def _process_batch(encoder: _Encoder, batch: _Batch, writers: dict[str, ShardWriter]) -> None:
    flat, lengths = encoder.encode(batch.texts)
    if any(p > 1 for p in batch.pieces):  # re-join the pieces of long documents (drop inner eos)
        keep = np.ones(flat.size, dtype=bool)
        ends = np.cumsum(lengths) - 1
        doc_lengths = []
        t = 0
        for p in batch.pieces:
            keep[ends[t : t + p - 1]] = False
            doc_lengths.append(int(lengths[t : t + p].sum()) - (p - 1))
            t += p
        flat = flat[keep]
        lengths = np.array(doc_lengths, dtype=np.int64)
    splits = np.array(batch.splits)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for split in SPLITS:
        sel = np.flatnonzero(splits == split)
        if sel.size == 0:
            continue
        if sel.size == len(splits):
            writers[split].add(flat, lengths)
            continue
        parts = [flat[offsets[i] : offsets[i + 1]] for i in sel]
        writers[split].add(np.concatenate(parts), lengths[sel])


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
    on_source_done: Callable[[str, SourceStats], None] | None = None,
) -> DatasetInfo:
    """Prepare `sources` with the tokenizer in `tokenizer_dir` into `out_dir` (and publish the result
    to `store` when given, under the ref `datasets/by-key/<key>` and `ref`).

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
        meta = _build(sources, files, digests, tok_path, tok_digest, tmp, key=key, cleaning=cleaning,
                      val_fraction=val_fraction, dedup=dedup, near_dedup=near_dedup,
                      near_dedup_threshold=near_dedup_threshold, skip_bad_lines=skip_bad_lines,
                      shard_tokens=shard_tokens, batch_chars=batch_chars, on_source_done=on_source_done)
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
    on_source_done: Callable[[str, SourceStats], None] | None,
) -> dict[str, Any]:
    encoder = _Encoder(tok_path)
    seen: set[int] = set()
    near = _NearDeduper(near_dedup_threshold) if near_dedup else None
    source_entries: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        for spec in sources:
            writers = {sp: ShardWriter(root, f"{sp}/{spec.name}", encoder.dtype, shard_tokens)
                       for sp in SPLITS}
            stats = SourceStats(removed=dict.fromkeys(FILTERS, 0))
            counters = ReadCounters()
            pending: list[Future[None]] = []
            batch = _Batch()

            def submit(b: _Batch, writers: dict[str, ShardWriter] = writers,
                       pending: list[Future[None]] = pending) -> None:
                pending.append(pool.submit(_process_batch, encoder, b, writers))
                while len(pending) > 1:  # at most one batch tokenizing while the next is cleaned
                    pending.pop(0).result()

            for doc_id, raw in iter_documents(spec, files[spec.name], skip_bad_lines=skip_bad_lines,
                                              counters=counters):
                stats.docs_read += 1
                if raw is None:
                    stats.removed["empty"] += 1
                    continue
                stats.bytes_read += len(raw.encode("utf-8")) if not raw.isascii() else len(raw)
                text, reason = clean_document(raw, spec.lang, cleaning)
                if text is None:
                    stats.removed[reason or "empty"] += 1
                    continue
                if dedup:
                    h = int.from_bytes(hashlib.blake2b(dedup_key(text), digest_size=8).digest(), "big")
                    if h in seen:
                        stats.exact_duplicates += 1
                        continue
                    seen.add(h)
                if near is not None and near.is_duplicate(text):
                    stats.near_duplicates += 1
                    continue
                split = split_of(spec.name, doc_id, val_fraction)
                if split == "val":
                    stats.val_docs += 1
                else:
                    stats.train_docs += 1
                pieces = list(_chunks(text, batch_chars)) if len(text) > batch_chars else [text]
                batch.texts.extend(pieces)
                batch.pieces.append(len(pieces))
                batch.splits.append(split)
                batch.chars += len(text)
                if batch.chars >= batch_chars:
                    submit(batch)
                    batch = _Batch()
            if batch.texts:
                submit(batch)
            while pending:
                pending.pop(0).result()
            stats.bad_lines_skipped = counters.bad_lines_skipped
            split_entries = {}
            for sp in SPLITS:
                shards = writers[sp].close()
                split_entries[sp] = {"tokens": writers[sp].total_tokens, "docs": writers[sp].total_docs,
                                     "shards": shards}
            stats.train_tokens = split_entries["train"]["tokens"]
            stats.val_tokens = split_entries["val"]["tokens"]
            _check_source_nonempty(spec, stats, files[spec.name], counters)
            source_entries.append({
                "name": spec.name, "lang": spec.lang, "role": spec.role, "text_field": spec.text_field,
                "digest": digests[spec.name], "spec": spec.model_dump(mode="json"),
                "stats": stats.model_dump(mode="json"), "splits": split_entries,
            })
            if on_source_done is not None:
                on_source_done(spec.name, stats)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "tokenizer_digest": tok_digest,
        "vocab_size": encoder.vocab_size,
        "eos_id": encoder.eos_id,
        "dtype": encoder.dtype.name,
        "val_fraction": val_fraction,
        "dedup": dedup,
        "near_dedup": near_dedup,
        "near_dedup_threshold": near_dedup_threshold if near_dedup else None,
        "cleaning": cleaning.model_dump(mode="json"),
        "token_counts": _token_counts(source_entries),
        "sources": source_entries,
    }
    (root / DATASET_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _check_source_nonempty(spec: SourceSpec, stats: SourceStats, files: list[ResolvedFile],
                           counters: ReadCounters) -> None:
    where = spec.hf_dataset or ", ".join(f.display for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if stats.docs_read == 0:
        extra = f" ({counters.bad_lines_skipped} bad lines skipped)" if counters.bad_lines_skipped else ""
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
