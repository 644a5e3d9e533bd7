"""Stream documents from files (JSONL, JSONL.gz, Parquet, plain text, gzip text) or a `datasets`
iterable, one string at a time, never holding a whole file in memory.

Errors name the file: a byte that is not UTF-8 is reported with its byte offset (in the
decompressed stream for .gz files), a bad JSON line or a missing text field with its line number.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.tokenizer.text import WHITESPACE_CLASS

TEXT_BLOCK_BYTES = 4 << 20
_TRAILING_SPACE_RE = re.compile(f"[{WHITESPACE_CLASS}]+$")
KNOWN_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".parquet", ".txt", ".txt.gz", ".text")

Corpus = Any  # Iterable[Path | str] of files, a single path, or a `datasets` (iterable) dataset of rows


def _name(path: Path) -> str:
    return path.name.lower()


def _open_binary(path: Path):  # noqa: ANN202
    if _name(path).endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = " of the decompressed data" if _name(path).endswith(".gz") else ""
        raise VinaSmolError(
            f"{path}: not valid UTF-8 at byte offset {offset + exc.start}{where} ({exc.reason})"
        ) from None


def iter_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    """Texts of a JSON Lines file (one object per line; blank lines skipped)."""
    offset = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                line = _decode(raw, path, start)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise VinaSmolError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise VinaSmolError(f"{path}: line {lineno} has no field {text_field!r}")
                text = row[text_field]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise VinaSmolError(f"{path}: line {lineno}: field {text_field!r} is not a string")
                yield text
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        if isinstance(exc, VinaSmolError):
            raise
        raise VinaSmolError(f"{path}: cannot read ({exc})") from None


def iter_text_file(path: Path, block_bytes: int = TEXT_BLOCK_BYTES) -> Iterator[str]:
    """A plain-text file as a stream of blocks of whole lines.

    Each block is cut just before the whitespace run that holds its last newline, so that no
    pre-tokenizer piece would be split differently than in the whole file."""
    pending_bytes = b""
    pending_text = ""
    offset = 0  # byte offset of pending_bytes[0]
    try:
        with _open_binary(path) as f:
            while True:
                chunk = f.read(block_bytes)
                eof = not chunk
                pending_bytes += chunk
                if eof:
                    cut = len(pending_bytes)
                else:
                    cut = pending_bytes.rfind(b"\n") + 1
                    if cut == 0:
                        continue  # a line longer than a block: read on
                text = pending_text + _decode(pending_bytes[:cut], path, offset)
                offset += cut
                pending_bytes = pending_bytes[cut:]
                if eof:
                    if text:
                        yield text
                    return
                m = _TRAILING_SPACE_RE.search(text)
                keep = m.start() if m else len(text)
                pending_text = text[keep:]
                if keep:
                    yield text[:keep]
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise VinaSmolError(f"{path}: cannot read ({exc})") from None


def iter_parquet(path: Path, text_field: str = "text") -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types
        raise VinaSmolError(f"{path}: not a readable Parquet file ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise VinaSmolError(f"{path}: Parquet file has no column {text_field!r}")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise VinaSmolError(f"{path}: column {text_field!r} does not hold strings")
            yield text


def iter_file(path: Path, text_field: str = "text") -> Iterator[str]:
    name = _name(path)
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")):
        return iter_jsonl(path, text_field)
    if name.endswith(".parquet"):
        return iter_parquet(path, text_field)
    return iter_text_file(path)


def expand_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Files named, and the corpus files under folders named (sorted); refuses missing paths."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and _name(f).endswith(KNOWN_SUFFIXES))
            if not found:
                raise VinaSmolError(f"{path}: folder holds no corpus files ({', '.join(KNOWN_SUFFIXES)})")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise VinaSmolError(f"corpus file {path} does not exist")
    return out


def iter_documents(corpus: Corpus, text_field: str = "text") -> Iterator[str]:
    """Every document of a corpus, streamed: a path, an iterable of paths (files or folders), or an
    iterable of rows (dicts holding `text_field`, such as a `datasets` dataset yields). Paths given
    in a list are checked before anything is read."""
    if isinstance(corpus, (str, Path)):
        corpus = [corpus]
    if isinstance(corpus, (list, tuple)):
        expand_paths([x for x in corpus if isinstance(x, (str, Path))])
    for item in corpus:
        if isinstance(item, (str, Path)):
            for path in expand_paths([item]):
                yield from iter_file(path, text_field)
        elif isinstance(item, dict):
            text = item.get(text_field)
            if isinstance(text, str):
                yield text
            elif text is not None or text_field not in item:
                raise VinaSmolError(f"corpus rows need a string field {text_field!r}")
        else:
            raise VinaSmolError(f"corpus items must be file paths or rows (dicts), not {type(item).__name__}")


def batched_by_chars(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    """Consecutive texts in lists of about `batch_chars` characters (the last may be shorter)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
