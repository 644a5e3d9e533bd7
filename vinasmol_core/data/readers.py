"""Reading documents from a source: local files and globs, fsspec URLs, or `datasets` by name.

Every reader streams: it holds one line (JSONL), one record batch (Parquet) or one file (text)."""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isal.isal_zlib import error as IsalError

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.data.spec import SourceSpec
from vinasmol_core.data.worker import Batch

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = set("*?[")
# What a missing, truncated or corrupt (compressed) file raises while it is read
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, IsalError)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedFile:
    """One input file: an fsspec URL or a local path, with how to read it."""

    url: str
    local: bool
    fmt: str  # jsonl | parquet | text
    compression: str | None

    @property
    def display(self) -> str:
        return self.url


@dataclass
class ReadCounters:
    """Problems the reader itself skipped (undecodable text files)."""

    bad_lines_skipped: int = 0
    bad_line_examples: list[str] = field(default_factory=list)


def _split_compression(name: str) -> tuple[str, str | None]:
    lower = name.lower()
    for suffix, comp in _COMPRESSIONS.items():
        if lower.endswith(suffix):
            return lower[: -len(suffix)], comp
    return lower, None


def _detect_format(name: str, requested: str) -> tuple[str, str | None]:
    base, comp = _split_compression(name)
    if requested != "auto":
        return requested, comp
    if base.endswith(_JSONL_SUFFIXES):
        return "jsonl", comp
    if base.endswith(".parquet"):
        return "parquet", comp
    return "text", comp


def resolve_files(spec: SourceSpec) -> list[ResolvedFile]:
    """Expand the source's paths and globs (sorted, deduplicated); VinaSmolError if one matches nothing."""
    out: list[ResolvedFile] = []
    seen: set[str] = set()
    for entry in spec.paths:
        if "://" in entry and not entry.startswith("file://"):
            import fsspec

            fs, root = fsspec.core.url_to_fs(entry)
            if _GLOB_CHARS & set(root):
                matches = sorted(fs.glob(root))
            else:
                matches = [root] if fs.exists(root) else []
            matches = [m for m in matches if not fs.isdir(m)]
            if not matches:
                raise VinaSmolError(f"source {spec.name!r}: {entry} matches no file")
            for m in matches:
                url = fs.unstrip_protocol(m)
                if url not in seen:
                    seen.add(url)
                    fmt, comp = _detect_format(m, spec.format)
                    out.append(ResolvedFile(url, False, fmt, comp))
            continue
        path_text = os.path.expanduser(entry.removeprefix("file://"))
        if _GLOB_CHARS & set(path_text):
            matches = sorted(m for m in globlib.glob(path_text, recursive=True) if os.path.isfile(m))
        elif os.path.isdir(path_text):
            matches = sorted(str(p) for p in Path(path_text).rglob("*") if p.is_file())
        elif os.path.isfile(path_text):
            matches = [path_text]
        else:
            raise VinaSmolError(f"source {spec.name!r}: file {entry} does not exist")
        if not matches:
            raise VinaSmolError(f"source {spec.name!r}: {entry} matches no file")
        for m in matches:
            if m not in seen:
                seen.add(m)
                fmt, comp = _detect_format(m, spec.format)
                out.append(ResolvedFile(m, True, fmt, comp))
    return out


def _open_binary(rf: ResolvedFile) -> Any:
    """A binary, decompressed file object."""
    if rf.local and rf.compression in (None, "gzip"):
        if rf.compression == "gzip":
            from isal import igzip  # about 2.5x faster than the standard library's gzip here

            return igzip.open(rf.url, "rb")
        return open(rf.url, "rb")  # noqa: SIM115
    import fsspec

    return fsspec.open(rf.url, "rb", compression=rf.compression).open()


def source_digest(spec: SourceSpec, files: list[ResolvedFile]) -> str:
    """A digest of the source's content: sha256 of every local file's bytes; for remote files the
    store's ETag/checksum and size when it has one (else the bytes); for a `datasets` dataset its
    name, config, split and revision (a commit hash: the pipeline pins a branch to its commit when
    it plans a run), and when it is read from a local folder (a hub mirror, or a folder named like
    the hub id, which `load_dataset` reads first), that folder's files."""
    h = hashlib.sha256()
    if spec.hf_dataset:
        ident = ["hf", spec.hf_dataset, spec.hf_config, spec.hf_split, spec.hf_revision]
        h.update(json.dumps(ident).encode())
        folder = spec.hf_path or spec.hf_dataset
        if os.path.isdir(folder):
            from vinasmol_core.hub import folder_digest

            h.update(folder_digest(Path(folder)).encode())
        for name in spec.hf_data_files:  # local data files (e.g. the `json` builder): their bytes
            if os.path.isfile(name):
                with open(name, "rb") as f:
                    h.update(hashlib.sha256(f.read()).hexdigest().encode())
        return h.hexdigest()
    for rf in files:
        h.update(os.path.basename(rf.url).encode() + b"\0")
        if rf.local:
            fh = hashlib.sha256()
            with open(rf.url, "rb") as f:
                while chunk := f.read(1 << 22):
                    fh.update(chunk)
            h.update(fh.hexdigest().encode())
            continue
        import fsspec

        fs, path = fsspec.core.url_to_fs(rf.url)
        info = fs.info(path)
        tag = next((str(info[k]) for k in ("ETag", "etag", "checksum", "md5", "sha256") if info.get(k)), None)
        if tag is not None:
            h.update(f"{tag}:{info.get('size')}".encode())
        else:
            fh = hashlib.sha256()
            with fs.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    fh.update(chunk)
            h.update(fh.hexdigest().encode())
    return h.hexdigest()


def _text_of(record: dict[str, Any], spec: SourceSpec, where: str) -> str | None:
    if spec.document is not None:
        from vinasmol_core.data.documents import render

        return render(record, spec.document, spec.name, where)
    if spec.text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:10])
        raise VinaSmolError(
            f"source {spec.name!r}: {where} has no field {spec.text_field!r} (fields: {fields}); "
            "set the source's text field"
        )
    text = record[spec.text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise VinaSmolError(
            f"source {spec.name!r}: {where}: field {spec.text_field!r} is {type(text).__name__}, not a string"
        )
    return text


def _id_of(record: dict[str, Any], spec: SourceSpec, fallback: str) -> str:
    if spec.id_field and spec.id_field in record and record[spec.id_field] is not None:
        return str(record[spec.id_field])
    return fallback


def _iter_parquet(rf: ResolvedFile, spec: SourceSpec) -> Iterator[tuple[str, str | None]]:
    import pyarrow.parquet as pq

    base = os.path.basename(rf.url)
    with _open_binary(rf) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if spec.text_field not in names:
            raise VinaSmolError(
                f"source {spec.name!r}: {rf.display} has no column {spec.text_field!r} "
                f"(columns: {', '.join(names[:10])}); set the source's text field"
            )
        cols = [spec.text_field] + ([spec.id_field] if spec.id_field and spec.id_field in names else [])
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts)
            for doc_id, text in zip(ids, texts, strict=True):
                row += 1
                if text is not None and not isinstance(text, str):
                    raise VinaSmolError(f"source {spec.name!r}: {rf.display} column {spec.text_field!r} "
                                        "is not a string column")
                yield (str(doc_id) if doc_id is not None else f"{base}:{row}"), text


def _iter_text(rf: ResolvedFile, spec: SourceSpec, skip_bad_lines: bool,
               counters: ReadCounters) -> Iterator[tuple[str, str | None]]:
    with _open_binary(rf) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        if skip_bad_lines:
            counters.bad_lines_skipped += 1
            if len(counters.bad_line_examples) < 5:
                counters.bad_line_examples.append(f"{rf.display}:{line}")
            return
        raise VinaSmolError(
            f"source {spec.name!r}: {rf.display} line {line} is not valid UTF-8 (byte {exc.start}); "
            "fix the file or pass --skip-bad-lines"
        ) from None
    yield os.path.basename(rf.url) if rf.local else rf.url, text.removeprefix("\ufeff")


def open_hf_dataset(spec: SourceSpec, split: str | None = None) -> Any:
    """`datasets.load_dataset` of the source (from `hf_path` when set, else the hub), streamed."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise VinaSmolError("reading a hub dataset needs the `datasets` package") from exc
    where = spec.hf_path or spec.hf_dataset
    try:
        extra = {"data_files": list(spec.hf_data_files)} if spec.hf_data_files else {}
        return datasets.load_dataset(where, spec.hf_config, split=split or spec.hf_split,
                                     streaming=spec.hf_streaming, revision=spec.hf_revision, **extra)
    except Exception as exc:  # network, missing dataset, bad config...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VinaSmolError(f"source {spec.name!r}: cannot open dataset {where!r}: {first}") from exc


def iter_hf_records(spec: SourceSpec, split: str | None = None, *, skip_bad_lines: bool = False,
                    counters: ReadCounters | None = None) -> Iterator[tuple[str, str | None]]:
    """(id, text) of a `datasets` source in order, up to its budget (`max_docs`, `max_bytes`): the
    stream is left as soon as the budget is reached, so nothing past it is downloaded.

    A shard that is not valid UTF-8 (a JSONL, CSV or text data file) stops the stream with an error,
    or, with `skip_bad_lines`, is skipped from its bad chunk on and counted in `counters` (the
    shards are then read one after another, in the same order)."""
    ds = open_hf_dataset(spec, split)
    where = spec.hf_path or spec.hf_dataset
    shards = _hf_shards(ds) if skip_bad_lines else [(ds, "")]
    docs = size = row = 0
    for shard, label in shards:
        records = iter(shard)
        while True:
            if (spec.max_docs and docs >= spec.max_docs) or (spec.max_bytes and size >= spec.max_bytes):
                return
            try:
                record = next(records)
            except StopIteration:
                break
            except Exception as exc:  # the stream broke (network, a corrupt or undecodable shard)
                bad = _decode_error(exc)
                if bad is not None and skip_bad_lines:
                    _count_bad_shard(counters, f"{where} {label}: not valid UTF-8 ({bad.reason}); "
                                               "the rest of the shard skipped")
                    break
                hint = "; fix the data or pass --skip-bad-lines" if bad is not None else ""
                raise VinaSmolError(f"source {spec.name!r}: reading {where} failed after {row} rows: "
                                    f"{exc}{hint}") from exc
            row += 1
            text = _text_of(record, spec, f"{spec.hf_dataset} row {row}")
            docs += 1
            size += len(text.encode("utf-8")) if text else 0
            yield _id_of(record, spec, f"{spec.hf_dataset}:{row}"), text


def _hf_shards(ds: Any) -> list[tuple[Any, str]]:
    """A streamed dataset as its shards (its data files, for a packaged builder), in order, each with
    a label naming it."""
    n = getattr(ds, "num_shards", 1) or 1
    if n <= 1 or not hasattr(ds, "shard"):
        return [(ds, "shard 1 of 1")]
    out = []
    for i in range(n):
        shard = ds.shard(num_shards=n, index=i, contiguous=True)
        files = getattr(getattr(shard, "_ex_iterable", None), "kwargs", {}).get("original_files") or []
        name = f" ({', '.join(os.path.basename(str(f)) for f in files[:3])})" if files else ""
        out.append((shard, f"shard {i + 1} of {n}{name}"))
    return out


def _decode_error(exc: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind an exception of a stream, if one is."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, UnicodeDecodeError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _count_bad_shard(counters: ReadCounters | None, example: str) -> None:
    log.warning("%s", example)
    if counters is None:
        return
    counters.bad_lines_skipped += 1
    if len(counters.bad_line_examples) < 5:
        counters.bad_line_examples.append(example)


def _iter_hf(spec: SourceSpec, skip_bad_lines: bool,
             counters: ReadCounters) -> Iterator[tuple[str, str | None]]:
    yield from iter_hf_records(spec, skip_bad_lines=skip_bad_lines, counters=counters)


def iter_batches(
    spec: SourceSpec, files: list[ResolvedFile], *, skip_bad_lines: bool, counters: ReadCounters,
    batch_chars: int = 1 << 21,
) -> Iterator[Batch]:
    """The source's records in order, cut into batches of about `batch_chars` characters. JSONL
    lines travel raw (the worker parses them); other formats travel as (id, text) records."""
    def new_batch(where: str = "", base_name: str = "") -> Batch:
        return Batch(source=spec.name, lang=spec.lang, text_field=spec.text_field, id_field=spec.id_field,
                     skip_bad_lines=skip_bad_lines, where=where, base_name=base_name)

    if spec.hf_dataset:
        records: Iterator[tuple[str, str | None]] = _iter_hf(spec, skip_bad_lines, counters)
        yield from _record_batches(records, new_batch(), new_batch, batch_chars)
        return
    for rf in files:
        try:
            yield from _file_batches(rf, spec, skip_bad_lines, counters, batch_chars, new_batch)
        except _READ_ERRORS as exc:
            raise VinaSmolError(f"source {spec.name!r}: cannot read {rf.display}: {exc}") from exc


def _file_batches(rf: ResolvedFile, spec: SourceSpec, skip_bad_lines: bool, counters: ReadCounters,
                  batch_chars: int, new_batch: Any) -> Iterator[Batch]:
    if rf.fmt == "jsonl":
        batch = new_batch(rf.display, os.path.basename(rf.url))
        with _open_binary(rf) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                batch.lines.append(line)
                batch.line_numbers.append(lineno)
                batch.chars += len(line)
                if batch.chars >= batch_chars:
                    yield batch
                    batch = new_batch(rf.display, os.path.basename(rf.url))
        if batch.lines:
            yield batch
    elif rf.fmt == "parquet":
        yield from _record_batches(_iter_parquet(rf, spec), new_batch(rf.display), new_batch, batch_chars)
    else:
        yield from _record_batches(_iter_text(rf, spec, skip_bad_lines, counters), new_batch(rf.display),
                                   new_batch, batch_chars)


def _record_batches(records: Iterator[tuple[str, str | None]], batch: Batch, new_batch: Any,
                    batch_chars: int) -> Iterator[Batch]:
    for doc_id, text in records:
        batch.ids.append(doc_id)
        batch.texts.append(text)
        batch.chars += len(text) if text else 0
        if batch.chars >= batch_chars:
            yield batch
            batch = new_batch(batch.where)
    if batch.ids:
        yield batch


def auto_workers(files: dict[str, list[ResolvedFile]], sources: list[SourceSpec]) -> int:
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
