"""The per-batch work of data preparation, run in worker processes (or in-process for small jobs).

A batch is raw JSONL lines of one file (parsed here, so parsing runs on every core) or already
decoded (id, text) records. For each document the worker parses, cleans and filters it, computes
its exact-dedup hash (and MinHash signature), its split, and its tokens. Decisions that need the
whole corpus (is this hash new? does LSH know a near-duplicate?) are left to the main process,
which sees the results in order.

WorkerPool runs the batches, in spawned worker processes or in this process, and gives back their
results in input order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import multiprocessing
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.data.clean import FILTERS, clean_document, dedup_hash
from vinasmol_core.data.curate import QUALITY_FILTERS, Curator
from vinasmol_core.data.curation import CurationSpec
from vinasmol_core.data.fastbpe import BPETables, FastByteLevelBPE
from vinasmol_core.data.spec import CleaningSpec, FilterStats

if TYPE_CHECKING:
    pass

# A sampled document is checked on at most this many leading characters (a prefix is a text like any
# other; the tokenizer's own encoder runs at about 1.5 MB/s, and whole documents made it 0.5 s of CPU
# per 90 MB).
VERIFY_CHARS = 4000


@dataclass
class WorkerConfig:
    tokenizer_path: str
    eos_id: int
    dtype: str
    cleaning: CleaningSpec
    val_fraction: float
    dedup: bool
    near_dedup: bool
    fast_tables: BPETables | None = None  # None: the tokenizer's own encoder
    curation: CurationSpec | None = None
    flagged_words: dict[str, frozenset[str]] = field(default_factory=dict)  # by language
    num_perm: int = 128
    ngram: int = 5


@dataclass
class Batch:
    """Work for one call. `lines` (raw JSONL, with `first_line` and `where`) or `ids` + `texts`."""

    source: str
    lang: str
    text_field: str
    id_field: str | None
    skip_bad_lines: bool
    where: str = ""
    base_name: str = ""
    line_numbers: list[int] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    verify: int = 0  # documents whose fast-path ids go back for the main process to check
    chars: int = 0


@dataclass
class BatchResult:
    docs_read: int
    bytes_read: int
    bad_lines: int
    bad_examples: list[str]
    removed: dict[str, int]
    filters: dict[str, FilterStats]  # by filter: removals and edits with bytes and examples
    hashes: np.ndarray  # uint64 per kept document (0 when dedup is off)
    is_val: np.ndarray  # bool per kept document
    lengths: np.ndarray  # int64 tokens per kept document, eos included
    tokens: np.ndarray  # all kept documents' tokens, concatenated
    minhashes: np.ndarray | None  # (kept, num_perm) hash values when near dedup is on
    samples: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (text, fast-path ids) to check


def split_is_val(source: str, doc_id: str, val_fraction: float) -> bool:
    """Stable: blake2b of (source name, document id) below val_fraction * 2**64."""
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{source}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2.0**64


class _State:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.dtype = np.dtype(cfg.dtype)
        self.fast = FastByteLevelBPE(cfg.fast_tables, self.dtype) if cfg.fast_tables is not None else None
        self._tokenizer: Any = None
        cur = cfg.curation
        self.curator = Curator(cur, cfg.flagged_words) if cur is not None and cur.enabled else None
        self._minhash: Any = None
        self._perms: Any = None
        if cfg.near_dedup:
            from datasketch import MinHash

            self._minhash = MinHash
            self._perms = MinHash(num_perm=cfg.num_perm, seed=1, **minhash_scheme()).permutations

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.fast is not None:
            return self.fast.encode(texts, self.cfg.eos_id, texts_are_nfc=self.cfg.cleaning.normalize)
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.cfg.tokenizer_path)
        return encode_with_tokenizer(self._tokenizer, texts, self.cfg.eos_id, self.dtype)

    def signature(self, text: str) -> np.ndarray:
        words = text.lower().split()
        n = self.cfg.ngram
        grams = {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        m = self._minhash(num_perm=self.cfg.num_perm, permutations=self._perms, **minhash_scheme())
        m.update_batch(list(grams))
        return np.asarray(m.hashvalues)


_STATE: _State | None = None


def encode_with_tokenizer(tokenizer: Any, texts: list[str], eos_id: int,
                          dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The tokenizer's own ids of `texts`, as FastByteLevelBPE.encode returns them."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        flat[pos : pos + len(x)] = x
        pos += len(x)
        flat[pos] = eos_id
        pos += 1
    return flat, lengths


def minhash_scheme() -> dict[str, str]:
    """datasketch >= 2 wants the permutation scheme named when state is passed in; 1.x has none."""
    import inspect

    from datasketch import MinHash

    return {"scheme": "affine32"} if "scheme" in inspect.signature(MinHash.__init__).parameters else {}


def init_worker(setup: Any) -> None:
    """Process-pool initializer: waits for the path of the pickled WorkerConfig on the `setup` queue
    (None, or a file already gone: the build ended without work for this worker). One tokenizer
    thread per process: the pool gives the parallelism."""
    global _STATE
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = setup.get()
    cfg = None
    if path is not None:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            cfg = pickle.load(f)
    _STATE = _State(cfg) if cfg is not None else None


def started() -> None:
    """A no-op task: submitting one per worker makes the pool start its processes."""


def local_state(cfg: WorkerConfig) -> _State:
    return _State(cfg)


def _parse_lines(
    batch: Batch, result_ids: list[str], result_texts: list[str | None]
) -> tuple[int, list[str]]:
    bad = 0
    examples: list[str] = []
    field_name = batch.text_field
    id_field = batch.id_field
    for lineno, line in zip(batch.line_numbers, batch.lines, strict=True):
        problem = None
        record: Any = None
        try:
            record = orjson.loads(line)
        except ValueError as exc:
            try:
                line.decode("utf-8")
                problem = f"not valid JSON ({exc})"
            except UnicodeDecodeError as uexc:
                problem = f"not valid UTF-8 (byte {uexc.start} of the line)"
        if problem is None and not isinstance(record, dict):
            problem = f"a JSON {type(record).__name__}, not an object"
        if problem is not None:
            if batch.skip_bad_lines:
                bad += 1
                if len(examples) < 5:
                    examples.append(f"{batch.where}:{lineno}")
                continue
            raise VinaSmolError(f"source {batch.source!r}: {batch.where} line {lineno} is {problem}; "
                                "fix the file or pass --skip-bad-lines")
        if field_name not in record:
            fields = ", ".join(sorted(map(str, record))[:10])
            raise VinaSmolError(f"source {batch.source!r}: {batch.where} line {lineno} has no field "
                                f"{field_name!r} (fields: {fields}); set the source's text field")
        text = record[field_name]
        if text is not None and not isinstance(text, str):
            raise VinaSmolError(f"source {batch.source!r}: {batch.where} line {lineno}: field {field_name!r} "
                                f"is {type(text).__name__}, not a string")
        doc_id = record.get(id_field) if id_field else None
        result_ids.append(str(doc_id) if doc_id is not None else f"{batch.base_name}:{lineno}")
        result_texts.append(text)
    return bad, examples


def process_batch(batch: Batch, state: _State | None = None) -> BatchResult:
    """Parse, clean, hash, split and tokenize one batch (see the module docstring)."""
    st = state or _STATE
    if st is None:
        raise RuntimeError("worker not initialised")
    cfg = st.cfg
    ids, texts = batch.ids, batch.texts
    bad, examples = 0, []
    if batch.lines:
        ids, texts = [], []
        bad, examples = _parse_lines(batch, ids, texts)
    removed = dict.fromkeys(FILTERS + (QUALITY_FILTERS if st.curator is not None else ()), 0)
    redact = functools.partial(st.curator.redact, lang=batch.lang) if st.curator is not None else None
    tally = _Tally(removed, redact)
    kept_texts: list[str] = []
    hashes: list[int] = []
    is_val: list[bool] = []
    bytes_read = 0
    for doc_id, raw in zip(ids, texts, strict=True):
        if raw is None:
            tally.remove("empty", doc_id, 0, "no text", "")
            continue
        n_bytes = _utf8_len(raw)
        bytes_read += n_bytes
        text = _curate(st.curator, raw, doc_id, batch.lang, cfg.cleaning, tally, n_bytes)
        if text is None:
            continue
        kept_texts.append(text)
        if cfg.dedup:
            hashes.append(dedup_hash(text))
        is_val.append(split_is_val(batch.source, doc_id, cfg.val_fraction))
    minhashes = np.stack([st.signature(t) for t in kept_texts]) if cfg.near_dedup and kept_texts else None
    if kept_texts:
        tokens, lengths = st.encode(kept_texts)
    else:
        tokens, lengths = np.zeros(0, st.dtype), np.zeros(0, np.int64)
    samples = []
    if batch.verify and st.fast is not None and kept_texts:
        step = max(1, len(kept_texts) // batch.verify)
        prefixes = [kept_texts[i][:VERIFY_CHARS] for i in range(0, len(kept_texts), step)[: batch.verify]]
        flat, counts = st.encode(prefixes)
        ends = np.cumsum(counts)
        samples = [(p, flat[end - n : end - 1]) for p, n, end in zip(prefixes, counts, ends, strict=True)]
    return BatchResult(
        docs_read=len(ids),
        bytes_read=bytes_read,
        bad_lines=bad,
        bad_examples=examples,
        removed=removed,
        filters=tally.filters,
        hashes=np.array(hashes, dtype=np.uint64) if cfg.dedup else np.zeros(len(kept_texts), np.uint64),
        is_val=np.array(is_val, dtype=bool),
        lengths=lengths,
        tokens=tokens,
        minhashes=minhashes,
        samples=samples,
    )


EXAMPLE_CHARS = 160


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class _Tally:
    """A batch's removals and edits per filter, with the first three examples of each."""

    def __init__(self, removed: dict[str, int], redact: Callable[[str], str] | None = None) -> None:
        self.removed = removed
        self.filters: dict[str, FilterStats] = {}
        self.redact = redact  # examples of removed documents keep no email or IP address either

    def _get(self, name: str) -> FilterStats:
        if name not in self.filters:
            self.filters[name] = FilterStats()
        return self.filters[name]

    def remove(self, name: str, doc_id: str, n_bytes: int, rule: str, text: str) -> None:
        self.removed[name] = self.removed.get(name, 0) + 1
        f = self._get(name)
        f.docs += 1
        f.bytes += n_bytes
        if len(f.examples) < 3:
            snippet = text[: EXAMPLE_CHARS * 2]
            snippet = self.redact(snippet) if self.redact is not None else snippet
            f.examples.append({"id": doc_id, "rule": rule, "text": snippet[:EXAMPLE_CHARS]})

    def edit(self, name: str, doc_id: str, cut: int, rule: str, text: str) -> None:
        f = self._get(name)
        f.edited += 1
        f.edited_bytes += cut
        if len(f.examples) < 3:
            f.examples.append({"id": doc_id, "rule": rule, "text": text[:EXAMPLE_CHARS]})


def _around(text: str, marker: str) -> str:
    """A short piece of `text` around the first `marker` (the whole start when it is absent)."""
    at = text.find(marker)
    return text[max(0, at - EXAMPLE_CHARS // 2):] if at >= 0 else text


def _curate(curator: Curator | None, raw: str, doc_id: str, lang: str, cleaning: CleaningSpec,
            tally: _Tally, n_bytes: int) -> str | None:
    """Encoding repair, cleaning, quality filters and PII redaction of one document (None: removed)."""
    text = raw
    if curator is not None:
        text = curator.repair(raw)
        if text != raw:
            at = next((i for i, (a, b) in enumerate(zip(raw, text, strict=False)) if a != b), 0)
            tally.edit("encoding", doc_id, n_bytes - _utf8_len(text), "mojibake repaired",
                       curator.redact(text[max(0, at - 40) : at + 2 * EXAMPLE_CHARS], lang))
    cleaned, reason = clean_document(text, lang, cleaning)
    if cleaned is None:
        tally.remove(reason or "empty", doc_id, n_bytes, reason or "empty", text)
        return None
    if curator is None:
        return cleaned
    out = curator.filter(cleaned, lang)
    if out.text is None:
        tally.remove(out.filter or "curation", doc_id, n_bytes, out.rule, cleaned)
        return None
    for name, cut in (out.edits or {}).items():
        tally.edit(name, doc_id, cut, "lines cut", curator.redact(out.text[: 2 * EXAMPLE_CHARS], lang))
    redacted = curator.redact(out.text, lang)
    if redacted != out.text:
        spec = curator.spec.pii
        marker = spec.email_placeholder if spec.email_placeholder in redacted else spec.ip_placeholder
        tally.edit("pii", doc_id, _utf8_len(out.text) - _utf8_len(redacted), "redacted",
                   _around(redacted, marker))
    return redacted


def process_in_worker(batch: Batch) -> BatchResult:
    """Entry point for pool workers (uses the state set up by init_worker)."""
    return process_batch(batch)


M = TypeVar("M")


class WorkerPool:
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

    def results(self, items: Iterable[Batch | M]) -> Iterator[BatchResult | M]:
        """Results in input order; items that are not batches (markers) pass through in their place."""
        if self.pool is None:
            for item in items:
                yield process_batch(item, self.state) if isinstance(item, Batch) else item
            return
        pending: deque[Future[BatchResult] | M] = deque()
        try:
            for item in items:
                pending.append(self.pool.submit(process_in_worker, item) if isinstance(item, Batch) else item)
                while sum(isinstance(p, Future) for p in pending) > 2 * self.n:
                    head = pending.popleft()
                    yield head.result() if isinstance(head, Future) else head
            while pending:
                head = pending.popleft()
                yield head.result() if isinstance(head, Future) else head
        except BrokenProcessPool as exc:
            raise VinaSmolError(f"a data worker process died ({exc}); out of memory? "
                                "try fewer --workers") from exc

    def __enter__(self) -> WorkerPool:
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
