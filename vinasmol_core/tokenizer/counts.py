"""The "train tokenizer" step: count the pre-tokenized words of a streamed corpus.

Text is NFC-normalised, then split exactly as the base tokenizer's pre-tokenizer splits it
(SmolLM2's by default: digits one by one, then GPT-2's ByteLevel regex), and every distinct
byte-level word is counted. Memory holds the count table and a few batches of text, never the
corpus.

Fast path (GPT-2-style pre-tokenizers: ByteLevel with its regex, optionally after Digits): no
piece of that pre-tokenizer ever spans the boundary between a non-space character and the
whitespace after it, and NFC never composes across that boundary either. So each document is
cut into segments (a whitespace run plus the non-space run after it), worker processes count
distinct segments with a C regex, and only the distinct segments are normalised and
pre-tokenized, by the Rust pre-tokenizer itself, in large batches. The result is identical to
pre-tokenizing every NFC document (the test suite checks this). Other pre-tokenizers take the
plain path: NFC and the Rust pre-tokenizer on every document, in the worker processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.tokenizer.corpus import Corpus, batched_by_chars, iter_documents
from vinasmol_core.tokenizer.text import (
    LEADING_SPACE_RE,
    NONSPACE_RE,
    SEGMENT_RE,
    VIETNAMESE_LETTERS,
    nfc,
    simple_pieces,
    to_byte_level,
)

COUNTS_FILE = "word_counts.json"
FORMAT = "vinasmol.word_counts/1"
BATCH_CHARS = 2_000_000
PRETOKENIZE_CHARS = 1_000_000

SMOLLM2_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


class CountStats(BaseModel):
    """What the counted corpus held (characters and bytes after NFC)."""

    documents: int = 0
    characters: int = 0
    bytes: int = 0
    whitespace_words: int = 0
    letters: int = 0
    vietnamese_letters: int = 0
    distinct_words: int = 0
    words: int = 0


class WordCountsInfo(BaseModel):
    """A saved WordCounts, as a pipeline step reports it."""

    path: str
    sha256: str
    stats: CountStats


@dataclass
class WordCounts:
    """Occurrences of each pre-tokenized word, in the byte-level alphabet (e.g. 'Ġngưá»Ŀi')."""

    words: dict[str, int]
    pre_tokenizer: dict[str, Any] = field(default_factory=lambda: dict(SMOLLM2_PRE_TOKENIZER))
    normalizer: str = "NFC"
    stats: CountStats = field(default_factory=CountStats)

    def __len__(self) -> int:
        return len(self.words)

    def sorted_items(self) -> list[tuple[str, int]]:
        """Words by decreasing count, ties by the word: a deterministic order."""
        return sorted(self.words.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "normalizer": self.normalizer,
            "pre_tokenizer": self.pre_tokenizer,
            "stats": self.stats.model_dump(),
            "words": self.sorted_items(),
        }

    def save(self, out_dir: Path) -> Path:
        """Write `word_counts.json` into `out_dir` (atomically); returns the file's path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / COUNTS_FILE
        fd, tmp = tempfile.mkstemp(prefix=".word_counts-", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, ensure_ascii=False, separators=(",", ":"))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    @classmethod
    def load(cls, path: Path) -> WordCounts:
        """Read a WordCounts from a folder holding `word_counts.json` (or from the file itself)."""
        path = Path(path)
        file = path / COUNTS_FILE if path.is_dir() else path
        if not file.is_file():
            raise VinaSmolError(f"{file}: no word counts here (expected {COUNTS_FILE})")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VinaSmolError(f"{file}: not a word-counts file ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise VinaSmolError(f"{file}: not a word-counts file (format {FORMAT} expected)")
        return cls(
            words={w: int(c) for w, c in data["words"]},
            pre_tokenizer=data["pre_tokenizer"],
            normalizer=data.get("normalizer", "NFC"),
            stats=CountStats(**data.get("stats", {})),
        )

    def info(self, path: Path) -> WordCountsInfo:
        file = Path(path)
        file = file / COUNTS_FILE if file.is_dir() else file
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        return WordCountsInfo(path=str(file), sha256=digest, stats=self.stats)


def load_pre_tokenizer_json(spec: dict[str, Any] | Path | str | None) -> dict[str, Any]:
    """A pre-tokenizer as JSON: given as JSON, or read from a tokenizer.json / tokenizer folder."""
    if spec is None:
        return json.loads(json.dumps(SMOLLM2_PRE_TOKENIZER))
    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VinaSmolError(f"{file}: cannot read a tokenizer.json ({exc})") from None
    pre = data.get("pre_tokenizer") if isinstance(data, dict) else None
    if not pre:
        raise VinaSmolError(f"{file}: tokenizer has no pre_tokenizer")
    return pre


def build_pre_tokenizer(pre_json: dict[str, Any]):  # noqa: ANN201
    """The Rust pre-tokenizer object described by `pre_json`."""
    from tokenizers import Tokenizer

    shell = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": pre_json, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"},
    }
    try:
        return Tokenizer.from_str(json.dumps(shell)).pre_tokenizer
    except Exception as exc:
        raise VinaSmolError(f"pre_tokenizer cannot be loaded: {exc}") from None


def _is_byte_level_regex(node: dict[str, Any]) -> bool:
    return (node.get("type") == "ByteLevel" and node.get("use_regex", True) is True
            and node.get("add_prefix_space", False) is False)


_NOT_SAFE = "not-safe"


def segment_mode(pre_json: dict[str, Any]) -> str | None:
    """How a GPT-2-style pre-tokenizer splits digits ("individual", "grouped" or None for none),
    or "not-safe" when the fast counting path does not apply to it."""
    if _is_byte_level_regex(pre_json):
        return None
    if pre_json.get("type") == "Sequence":
        steps = pre_json.get("pretokenizers") or []
        if len(steps) == 2 and steps[0].get("type") == "Digits" and _is_byte_level_regex(steps[1]):
            return "individual" if steps[0].get("individual_digits") else "grouped"
    return _NOT_SAFE


def segment_safe(pre_json: dict[str, Any]) -> bool:
    """True for the GPT-2-style pre-tokenizers the fast counting path is exact for."""
    return segment_mode(pre_json) != _NOT_SAFE


# ---- worker side (module-level functions, so that worker processes can run them) ----

_WORKER_PRE: dict[str, Any] = {}


def _pre_for(pre_text: str) -> Any:
    pre = _WORKER_PRE.get(pre_text)
    if pre is None:
        pre = _WORKER_PRE[pre_text] = build_pre_tokenizer(json.loads(pre_text))
    return pre


def _count_segments(texts: list[str]) -> dict[str, int]:
    counter: Counter[str] = Counter()
    findall = SEGMENT_RE.findall
    for text in texts:
        counter.update(findall(text))
    return dict(counter)


def _text_stats(text: str, n: int, stats: Counter) -> None:
    stats["characters"] += len(text) * n
    stats["bytes"] += len(text.encode("utf-8")) * n
    stats["whitespace_words"] += len(NONSPACE_RE.findall(text)) * n
    stats["letters"] += sum(1 for ch in text if ch.isalpha()) * n
    if not text.isascii():
        stats["vietnamese_letters"] += sum(1 for ch in text if ch in VIETNAMESE_LETTERS) * n


def _segments_to_pieces(items: list[tuple[str, int]], digits: str | None
                        ) -> tuple[dict[str, int], list[tuple[str, int]], dict[str, int]]:
    """NFC each segment and split it with the exact Python copy of the regex where it applies.
    Returns the byte-level piece counts, the NFC segments left for the Rust pre-tokenizer, and
    text stats."""
    pieces: dict[str, int] = {}
    get = pieces.get
    rest: list[tuple[str, int]] = []
    stats: Counter = Counter()
    for seg, n in items:
        seg = nfc(seg)
        _text_stats(seg, n, stats)
        simple = simple_pieces(seg, digits)
        if simple is None:
            rest.append((seg, n))
            continue
        for raw_piece in simple:
            piece = to_byte_level(raw_piece)
            pieces[piece] = get(piece, 0) + n
    return pieces, rest, dict(stats)


def _count_pieces_plain(texts: list[str], pre_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Plain path: pieces of every NFC document by the Rust pre-tokenizer, and text stats."""
    pre = _pre_for(pre_text)
    counter: Counter[str] = Counter()
    stats: Counter = Counter()
    for text in texts:
        text = nfc(text)
        counter.update(p for p, _ in pre.pre_tokenize_str(text))
        _text_stats(text, 1, stats)
    return dict(counter), dict(stats)


# ---- driver ----

def _counted(docs: Iterator[str], stats: CountStats) -> Iterator[str]:
    """The non-empty documents, every document counted in `stats`."""
    for text in docs:
        stats.documents += 1
        if text:
            yield text


def _mp_context() -> multiprocessing.context.BaseContext:
    # Workers use only `re`, `tokenizers` pre-tokenizers and plain Python objects.
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Runner:
    """Applies functions to batches, in a process pool made on first need (never for one batch)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, batches: Iterator[Any], fn: Any, merge: Any, *args: Any) -> None:
        """merge(fn(batch, *args)) for each batch, at most 2 * workers batches in flight."""
        first = next(batches, None)
        if first is None:
            return
        second = next(batches, None)
        if self.workers <= 1 or (second is None and self.pool is None):
            for batch in _chain([first] + ([second] if second is not None else []), batches):
                merge(fn(batch, *args))
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context())
        pending: list[Future] = []
        for batch in _chain([first] + ([second] if second is not None else []), batches):
            pending.append(self.pool.submit(fn, batch, *args))
            while len(pending) >= 2 * self.workers:
                merge(pending.pop(0).result())
        for fut in pending:
            merge(fut.result())


def _chain(head: list[Any], tail: Iterator[Any]) -> Iterator[Any]:
    yield from head
    yield from tail


def _chunks(items: list[Any], parts: int) -> Iterator[list[Any]]:
    step = max(1, -(-len(items) // max(1, parts)))
    for i in range(0, len(items), step):
        yield items[i:i + step]


def _rust_pieces(rest: list[tuple[str, int]], pre: Any, pieces: dict[str, int]) -> None:
    """Add the pieces of NFC segments split by the Rust pre-tokenizer.

    Segments that start with whitespace are concatenated (up to PRETOKENIZE_CHARS characters per
    call): the boundary before a whitespace run that follows a non-space character is a piece
    boundary, so the pieces of the concatenation are the pieces of the segments. The others
    (document starts, whitespace-only tails) are split one by one."""
    import numpy as np

    get = pieces.get
    batch: list[str] = []
    weights: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal batch, weights, size
        if not batch:
            return
        starts = np.cumsum([0] + [len(s) for s in batch[:-1]])
        result = pre.pre_tokenize_str("".join(batch))
        offsets = np.fromiter((o[0] for _, o in result), dtype=np.int64, count=len(result))
        owner = np.searchsorted(starts, offsets, side="right") - 1
        w = np.asarray(weights, dtype=np.int64)[owner].tolist()
        for (piece, _), n in zip(result, w, strict=True):
            pieces[piece] = get(piece, 0) + n
        batch, weights, size = [], [], 0

    for seg, n in rest:
        if LEADING_SPACE_RE.match(seg) and NONSPACE_RE.search(seg):
            batch.append(seg)
            weights.append(n)
            size += len(seg)
            if size >= PRETOKENIZE_CHARS:
                flush()
        else:
            for piece, _ in pre.pre_tokenize_str(seg):
                pieces[piece] = get(piece, 0) + n
    flush()


def count_words(
    corpus: Corpus,
    text_field: str = "text",
    *,
    pre_tokenizer: dict[str, Any] | Path | str | None = None,
    workers: int | None = None,
) -> WordCounts:
    """Count the pre-tokenized words of `corpus` (files, folders or rows; see `iter_documents`).

    `pre_tokenizer`: the base tokenizer's pre-tokenizer as JSON or a tokenizer.json / folder to
    read it from (default: SmolLM2's). `workers`: processes for counting (default: CPU count, at
    most 8). Raises VinaSmolError for an empty corpus or an unreadable file."""
    pre_json = load_pre_tokenizer_json(pre_tokenizer)
    pre = build_pre_tokenizer(pre_json)
    pre_text = json.dumps(pre_json, sort_keys=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    stats = CountStats()
    batches = batched_by_chars(_counted(iter_documents(corpus, text_field), stats), BATCH_CHARS)
    words: dict[str, int] = {}
    totals: Counter = Counter()
    mode = segment_mode(pre_json)
    with _Runner(workers) as runner:
        if mode != _NOT_SAFE:
            raw: Counter[str] = Counter()
            runner.run(batches, _count_segments, raw.update)
            items = list(raw.items())
            del raw
            rest: list[tuple[str, int]] = []

            def merge_pieces(result: tuple[dict[str, int], list[tuple[str, int]], dict[str, int]]) -> None:
                for piece, n in result[0].items():
                    words[piece] = words.get(piece, 0) + n
                rest.extend(result[1])
                totals.update(result[2])

            parts = runner.workers * 2 if runner.pool is not None else 1
            runner.run(_chunks(items, parts), _segments_to_pieces, merge_pieces, mode)
            del items
            _rust_pieces(rest, pre, words)
        else:
            def merge_plain(result: tuple[dict[str, int], dict[str, int]]) -> None:
                for piece, n in result[0].items():
                    words[piece] = words.get(piece, 0) + n
                totals.update(result[1])

            runner.run(batches, _count_pieces_plain, merge_plain, pre_text)
    for key, value in totals.items():
        setattr(stats, key, int(value))
    if not words:
        raise VinaSmolError("the corpus is empty: no document holds any text"
                            f" ({stats.documents} documents read)")
    stats.distinct_words = len(words)
    stats.words = sum(words.values())
    return WordCounts(words=words, pre_tokenizer=pre_json, stats=stats)
