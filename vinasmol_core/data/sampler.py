"""Deterministic, resumable mixture sampling of fixed-length sequences from a prepared dataset.

`MixtureSampler.sequence(i)` is a pure function of (dataset, weights, seq_len, seed, stage, i):

- Source choice: global indices are cut into blocks of `block_size`. Each block holds every
  source exactly `round(weight * block_size)` times (largest remainder; at least once for a positive
  weight), in an order shuffled by a generator seeded with (seed, stage, block). Proportions are exact
  to 1/block_size in every block; `effective_mixture()` reports them next to the requested ones.
- Window choice: the n-th draw of a source (n counts that source's slots in earlier blocks and
  earlier in the block) takes position n of a seeded Feistel permutation of the source's windows,
  a new permutation for every pass (epoch) over the source. A window is `seq_len + 1` tokens at
  offset `shift + j * seq_len` in the source's token stream, `shift` drawn per (seed, stage, source),
  so different stages cut and order the data differently.
- Long-context view: windows starting inside a document of at least `min_doc_tokens` tokens get
  extra copies in the permuted domain, so they are drawn `factor` times as often.

Nothing is precomputed per index: the state of a consumer is just the next global index.
Data-parallel rank r of `world` takes the indices i with i % world == r.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.data.prepare import load_dataset_meta
from vinasmol_core.data.shards import SourceTokens
from vinasmol_core.data.spec import LANGS, ROLES, LongContextSpec
from vinasmol_core.data.tokcheck import check_tokenizer

_MASK64 = (1 << 64) - 1
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val"}


def _hash64(*parts: object) -> int:
    h = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def _mix64(x: int) -> int:
    """splitmix64 finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded bijection of range(n): a balanced Feistel network with cycle walking. O(1) memory."""

    def __init__(self, n: int, key: int, rounds: int = 4) -> None:
        if n < 1:
            raise ValueError("permutation domain must be non-empty")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64(key ^ (r * 0x632BE59BD9B4E019)) for r in range(rounds)]

    def __call__(self, x: int) -> int:
        if self.n == 1:
            return 0
        half, mask, keys = self.half, self.mask, self.keys
        while True:
            left, right = x >> half, x & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            x = (left << half) | right
            if x < self.n:
                return x


@dataclass
class _Source:
    name: str
    lang: str
    role: str
    weight: float
    stream: SourceTokens
    shift: int
    n_windows: int
    long_windows: np.ndarray  # window indices whose first token lies in a long document
    n_extra: int  # extra draws given to long windows per pass

    @property
    def domain(self) -> int:
        return self.n_windows + self.n_extra


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    if not weights:
        raise ConfigError("mixture weights are empty: give at least one key (vi, en, code, annealing, "
                          "or a source name)")
    out: dict[str, float] = {}
    for key, value in weights.items():
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"mixture weight for {key!r} is not a number: {value!r}") from None
        if not math.isfinite(w):
            raise ConfigError(f"mixture weight for {key!r} is not finite: {value!r}")
        if w < 0:
            raise ConfigError(f"mixture weight for {key!r} is negative ({w}); weights must be >= 0")
        out[str(key)] = w
    if sum(out.values()) <= 0:
        raise ConfigError(f"mixture weights sum to zero ({out}); at least one must be positive")
    return out


def resolve_weight_keys(weights: Mapping[str, float], sources: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Which sources each weight key takes. A source name takes that source; a role (`annealing`,
    `main`) takes the sources of that role not named; a language tag takes the remaining *main*
    sources of that language (annealing sources enter a mixture only by role or name)."""
    names = {s["name"] for s in sources}
    claimed: dict[str, str] = {}
    groups: dict[str, list[str]] = {k: [] for k in weights}
    for key in weights:
        if key in names:
            groups[key].append(key)
            claimed[key] = key
        elif key not in LANGS and key not in ROLES:
            raise ConfigError(
                f"mixture weight key {key!r} is neither a language ({', '.join(LANGS)}), a role "
                f"({', '.join(ROLES)}) nor a source of this dataset ({', '.join(sorted(names))})"
            )
    for key in weights:
        if key in ROLES and key not in names:
            for s in sources:
                if s["role"] == key and s["name"] not in claimed:
                    groups[key].append(s["name"])
                    claimed[s["name"]] = key
    for key in weights:
        if key in LANGS and key not in names:
            for s in sources:
                if s["lang"] == key and s["role"] == "main" and s["name"] not in claimed:
                    groups[key].append(s["name"])
                    claimed[s["name"]] = key
    return groups


class MixtureSampler:
    """Fixed-length sequences (seq_len + 1 tokens, int64) drawn from a prepared dataset's sources
    with the given weights; see the module docstring for the exact rule."""

    def __init__(
        self,
        dataset_dir: Path | str,
        weights: Mapping[str, float],
        seq_len: int,
        *,
        seed: int = 0,
        stage: str = "",
        split: str = "train",
        long_context: LongContextSpec | None = None,
        block_size: int = 4096,
        tokenizer_dir: Path | str | None = None,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.meta = load_dataset_meta(self.dataset_dir)
        if tokenizer_dir is not None:
            check_tokenizer(self.dataset_dir, tokenizer_dir)
        if seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {seq_len}")
        if split not in _SPLIT_ALIASES:
            raise ConfigError(f"split must be train or val, got {split!r}")
        if block_size < 16:
            raise ConfigError(f"block_size must be at least 16, got {block_size}")
        self.seq_len = seq_len
        self.seed = int(seed)
        self.stage = stage
        self.split = _SPLIT_ALIASES[split]
        self.long_context = long_context
        self.block_size = block_size
        self.weights = _check_weights(weights)
        self._base = _hash64("mixture", self.seed, self.stage)
        self.sources = self._build_sources()
        probs = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.probabilities = probs / probs.sum()
        self._counts = self._block_counts(self.probabilities, block_size)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    # -- construction -------------------------------------------------------------------------------
    def _build_sources(self) -> list[_Source]:
        metas = self.meta["sources"]
        groups = resolve_weight_keys(self.weights, metas)
        by_name = {s["name"]: s for s in metas}
        need = self.seq_len + 1
        out: list[_Source] = []
        for key, weight in self.weights.items():
            names = groups[key]
            if not names:
                raise ConfigError(f"mixture weight key {key!r} matches no source of {self.dataset_dir} "
                                  f"(sources: {', '.join(sorted(by_name))})")
            if weight == 0:
                continue
            tokens = {n: int(by_name[n]["splits"][self.split]["tokens"]) for n in names}
            usable = {n: t for n, t in tokens.items() if t >= need}
            if not usable:
                raise ConfigError(
                    f"mixture weight key {key!r}: its sources ({', '.join(names)}) have no {self.split} "
                    f"sequence of {need} tokens (tokens: {tokens})"
                )
            total = sum(usable.values())
            for n, t in usable.items():
                out.append(self._make_source(by_name[n], weight * t / total))
        return out

    def _make_source(self, meta: dict[str, Any], weight: float) -> _Source:
        stream = SourceTokens(self.dataset_dir, meta["splits"][self.split]["shards"])
        L = self.seq_len
        shift = _hash64(self._base, "shift", meta["name"]) % L
        if stream.n_tokens - shift < L + 1:
            shift = 0
        n_windows = (stream.n_tokens - 1 - shift) // L
        long_windows = np.zeros(0, dtype=np.int64)
        n_extra = 0
        lc = self.long_context
        if lc is not None and lc.factor > 1.0:
            min_tokens = lc.min_doc_tokens or L
            offsets = stream.doc_offsets()
            lengths = np.diff(offsets)
            long_docs = np.flatnonzero(lengths >= min_tokens)
            if long_docs.size:
                # windows j whose first token shift + j*L lies in [start, end) of a long document
                first = np.maximum(0, -(-(offsets[long_docs] - shift) // L))
                last = np.minimum(n_windows, -(-(offsets[long_docs + 1] - shift) // L))
                counts = np.maximum(0, last - first)
                if counts.sum():
                    base = np.repeat(first - np.cumsum(counts) + counts, counts)
                    long_windows = base + np.arange(counts.sum())
                    n_extra = int(round((lc.factor - 1.0) * long_windows.size))
        return _Source(meta["name"], meta["lang"], meta["role"], weight, stream, int(shift), int(n_windows),
                       long_windows.astype(np.int64), n_extra)

    @staticmethod
    def _block_counts(probs: np.ndarray, block: int) -> np.ndarray:
        """Slots per source in a block: largest remainder, and at least one slot for every positive
        probability (taken from the source with the most slots), so no source silently vanishes."""
        raw = probs * block
        counts = np.floor(raw).astype(np.int64)
        rest = block - int(counts.sum())
        if rest:
            order = np.argsort(-(raw - counts), kind="stable")
            counts[order[:rest]] += 1
        for s in np.flatnonzero((probs > 0) & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[s] = 1
        return counts

    def effective_mixture(self) -> dict[str, dict[str, float]]:
        """Per source: the probability asked for and the share of slots it really gets."""
        return {
            s.name: {"requested": float(p), "effective": int(c) / self.block_size}
            for s, p, c in zip(self.sources, self.probabilities, self._counts, strict=True)
        }

    def mixture_warnings(self, tolerance: float = 0.1) -> list[str]:
        """One line per source whose effective share is off its requested share by more than
        `tolerance` (relative): a weight too small for the block size."""
        out = []
        for name, m in self.effective_mixture().items():
            if abs(m["effective"] - m["requested"]) > tolerance * m["requested"]:
                out.append(
                    f"mixture: source {name} asked for {m['requested']:.3g} of the sequences but gets "
                    f"{m['effective']:.3g} (1 of every {self.block_size} is the least a source can get)"
                )
        return out

    # -- indexing -----------------------------------------------------------------------------------
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._blocks.get(b)
        if cached is not None:
            self._blocks.move_to_end(b)
            return cached
        assign = np.repeat(np.arange(len(self.sources), dtype=np.int64), self._counts)
        rng = np.random.Generator(np.random.Philox(key=[self._base, b & _MASK64]))
        assign = rng.permutation(assign)
        order = np.argsort(assign, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        ranks = np.empty_like(assign)
        ranks[order] = np.arange(assign.size) - np.repeat(starts, self._counts)
        self._blocks[b] = (assign, ranks)
        if len(self._blocks) > 8:
            self._blocks.popitem(last=False)
        return assign, ranks

    def _perm(self, s: int, epoch: int) -> FeistelPermutation:
        key = (s, epoch)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 256:
                self._perms.clear()
            src = self.sources[s]
            perm = FeistelPermutation(src.domain, _hash64(self._base, "perm", src.name, epoch))
            self._perms[key] = perm
        return perm

    def _locate(self, i: int) -> tuple[int, int, int]:
        if i < 0:
            raise IndexError(f"sequence index must be >= 0, got {i}")
        b, r = divmod(int(i), self.block_size)
        assign, ranks = self._block(b)
        s = int(assign[r])
        n = b * int(self._counts[s]) + int(ranks[r])
        src = self.sources[s]
        epoch, v = divmod(n, src.domain)
        w = self._perm(s, epoch)(v)
        if w >= src.n_windows:
            w = int(src.long_windows[(w - src.n_windows) % src.long_windows.size])
        return s, src.shift + w * self.seq_len, epoch

    def locate(self, i: int) -> tuple[str, int, int]:
        """(source name, token offset of the window in the source's stream, epoch) of sequence i."""
        s, offset, epoch = self._locate(i)
        return self.sources[s].name, offset, epoch

    def sequence(self, i: int) -> np.ndarray:
        """seq_len + 1 token ids (int64) of global sequence i."""
        s, offset, _ = self._locate(i)
        return self.sources[s].stream.read(offset, self.seq_len + 1)

    def batch(self, step: int, micro_batch: int, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """(micro_batch, seq_len + 1) int64: the sequences rank `rank` of `world_size` gets at `step`:
        global indices step*micro_batch*world_size + rank + world_size*j, j < micro_batch."""
        base = step * micro_batch * world_size + rank
        return np.stack([self.sequence(base + world_size * j) for j in range(micro_batch)])

    def stream(self, micro_batch: int, *, rank: int = 0, world_size: int = 1,
               next_index: int | None = None) -> SequenceStream:
        return SequenceStream(self, micro_batch, rank=rank, world_size=world_size, next_index=next_index)


class SequenceStream:
    """One data-parallel rank's iterator of micro-batches; its whole state is the next global index."""

    def __init__(self, sampler: MixtureSampler, micro_batch: int, *, rank: int = 0, world_size: int = 1,
                 next_index: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.sampler = sampler
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.next_index = rank if next_index is None else int(next_index)
        if self.next_index % world_size != rank:
            raise ConfigError(f"next_index {self.next_index} does not belong to rank {rank} of {world_size}")

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        idx = [self.next_index + self.world_size * j for j in range(self.micro_batch)]
        self.next_index = idx[-1] + self.world_size
        return np.stack([self.sampler.sequence(i) for i in idx])

    def state_dict(self) -> dict[str, int]:
        return {"next_index": self.next_index, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from any rank's state, also under another world size: every rank has consumed the
        global indices below `next_index - rank` (they step in lockstep), so this rank continues at
        that point of the global order plus its own rank."""
        consumed = int(state["next_index"]) - int(state.get("rank", 0))
        self.next_index = consumed + self.rank


def validation_sequences(dataset_dir: Path | str, key: str, seq_len: int,
                         max_sequences: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive, non-overlapping windows of seq_len + 1 tokens from the validation split of the
    sources a key takes (a language tag, role or source name), in order: for per-language loss."""
    dataset_dir = Path(dataset_dir)
    meta = load_dataset_meta(dataset_dir)
    groups = resolve_weight_keys({key: 1.0}, meta["sources"])
    by_name = {s["name"]: s for s in meta["sources"]}
    count = 0
    for name in groups[key]:
        stream = SourceTokens(dataset_dir, by_name[name]["splits"]["val"]["shards"])
        for start in range(0, stream.n_tokens - seq_len, seq_len):
            if max_sequences is not None and count >= max_sequences:
                return
            yield stream.read(start, seq_len + 1)
            count += 1
