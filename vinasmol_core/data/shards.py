"""Token shards on disk: plain `.npy` arrays (no pickle), one stream per (split, source).

Layout under a dataset folder:
    dataset.json                         what the folder holds (see prepare.py)
    <split>/<source>/<k:05d>.npy          1-D uint16 (vocabulary <= 65,536) or uint32 token ids;
                                          every document is followed by <|endoftext|>
    <split>/<source>/<k:05d>.docs.npy     int64 document start offsets within that shard, plus the
                                          shard's length as a last entry (the document index)
Documents never straddle shards; a source's stream is its shards in order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vinasmol_core.common.errors import VinaSmolError


def dtype_for_vocab(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Buffers whole documents and writes a shard each time `shard_tokens` are buffered.

    Memory is bounded by one shard plus one added batch, whatever the corpus size."""

    def __init__(self, root: Path, rel_dir: str, dtype: np.dtype[Any], shard_tokens: int) -> None:
        self.root = root
        self.rel_dir = rel_dir
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self._tokens: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.total_tokens = 0
        self.total_docs = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append whole documents: `tokens` is their concatenation, `doc_lengths` their sizes."""
        if tokens.size == 0:
            return
        self._tokens.append(tokens.astype(self.dtype, copy=False))
        self._lengths.append(doc_lengths.astype(np.int64, copy=False))
        self._buffered += int(tokens.size)
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        tokens = np.concatenate(self._tokens) if len(self._tokens) > 1 else self._tokens[0]
        lengths = np.concatenate(self._lengths) if len(self._lengths) > 1 else self._lengths[0]
        self._tokens, self._lengths, self._buffered = [], [], 0
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if int(offsets[-1]) != tokens.size:
            raise AssertionError("document lengths do not add up to the shard length")
        k = len(self.shards)
        rel = f"{self.rel_dir}/{k:05d}.npy"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.lib.format.write_array(f, tokens, allow_pickle=False)
        with open(self.root / f"{self.rel_dir}/{k:05d}.docs.npy", "wb") as f:
            np.lib.format.write_array(f, offsets, allow_pickle=False)
        self.shards.append({"path": rel, "tokens": int(tokens.size), "docs": int(lengths.size)})
        self.total_tokens += int(tokens.size)
        self.total_docs += int(lengths.size)

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.shards


def load_npy(path: Path, *, mmap: bool = True) -> np.ndarray:
    """Load one `.npy` without pickle, memory-mapped by default."""
    if not path.exists():
        raise VinaSmolError(f"dataset file {path} is missing")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


class SourceTokens:
    """One source's token stream in one split: memory-mapped shards seen as one array."""

    def __init__(self, dataset_dir: Path, shards: list[dict[str, Any]]) -> None:
        self.dataset_dir = dataset_dir
        self._paths = [dataset_dir / s["path"] for s in shards]
        sizes = np.array([int(s["tokens"]) for s in shards], dtype=np.int64)
        self.starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.starts[1:])
        self.n_tokens = int(self.starts[-1])
        self._maps: list[np.ndarray | None] = [None] * len(shards)

    def _shard(self, k: int) -> np.ndarray:
        arr = self._maps[k]
        if arr is None:
            arr = load_npy(self._paths[k])
            self._maps[k] = arr
        return arr

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (may span shard boundaries)."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"range {start}+{length} outside a stream of {self.n_tokens} tokens")
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[k])
        shard = self._shard(k)
        if local + length <= shard.shape[0]:
            return np.asarray(shard[local : local + length], dtype=np.int64)
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            shard = self._shard(k)
            take = min(length - filled, shard.shape[0] - local)
            out[filled : filled + take] = shard[local : local + take]
            filled += take
            k, local = k + 1, 0
        return out

    def doc_offsets(self) -> np.ndarray:
        """Start offsets of every document in the stream, plus the stream length (int64)."""
        parts = [np.zeros(1, dtype=np.int64)]
        for k, path in enumerate(self._paths):
            offs = load_npy(Path(os.fspath(path)[: -len(".npy")] + ".docs.npy"), mmap=False)
            parts.append(offs[1:] + self.starts[k])
        return np.concatenate(parts)
