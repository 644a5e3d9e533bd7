"""A base byte-level BPE tokenizer (SmolLM2's, or any GPT-2-style tokenizer.json), checked and
split into the parts vocabulary extension needs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.tokenizer.text import bytes_to_unicode


def tokenizer_file(path: Path) -> Path:
    """tokenizer.json inside a folder, or the file itself."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return True
        return any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


def parse_merges(raw: list[Any], where: str) -> list[tuple[str, str]]:
    """Merges as pairs, from either tokenizer.json layout ("a b" strings or [a, b] lists)."""
    merges: list[tuple[str, str]] = []
    for m in raw:
        if isinstance(m, str):
            parts = m.split(" ")
        else:
            parts = list(m)
        if len(parts) != 2:
            raise VinaSmolError(f"{where}: malformed merge {m!r}")
        merges.append((parts[0], parts[1]))
    return merges


@dataclass
class BaseTokenizer:
    """A loaded, validated byte-level BPE tokenizer.json."""

    path: Path
    data: dict[str, Any]
    tokens: list[str]  # id -> string, ids 0..V-1
    merges: list[tuple[str, str]]
    sha256: str

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, path: Path) -> BaseTokenizer:
        """Load and check a base tokenizer (folder or tokenizer.json). Raises VinaSmolError naming
        the file when it is not a byte-level BPE this code can extend."""
        file = tokenizer_file(path)
        if not file.is_file():
            raise VinaSmolError(f"base tokenizer {file} does not exist")
        raw = file.read_bytes()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VinaSmolError(f"{file}: not a tokenizer.json ({exc})") from None
        model = data.get("model") if isinstance(data, dict) else None
        kind = model.get("type", "BPE" if "merges" in model else None) if isinstance(model, dict) else None
        if kind != "BPE":
            raise VinaSmolError(f"{file}: base tokenizer must be byte-level BPE, its model is {kind!r}")
        assert isinstance(model, dict)
        if not (_has_byte_level(data.get("pre_tokenizer")) and _has_byte_level(data.get("decoder"))):
            raise VinaSmolError(f"{file}: base tokenizer must be byte-level BPE (ByteLevel pre-tokenizer and "
                                "decoder); this one is not byte-level")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise VinaSmolError(f"{file}: BPE with {key}={model[key]!r} is not GPT-2-style")
        if model.get("ignore_merges"):
            raise VinaSmolError(f"{file}: BPE with ignore_merges=true is not GPT-2-style; not supported")
        if model.get("dropout"):
            raise VinaSmolError(f"{file}: BPE dropout is set; extension needs a deterministic base")
        vocab: dict[str, int] = model.get("vocab") or {}
        size = len(vocab)
        tokens: list[str | None] = [None] * size
        for tok, idx in vocab.items():
            if not isinstance(idx, int) or not 0 <= idx < size or tokens[idx] is not None:
                raise VinaSmolError(f"{file}: vocabulary ids are not exactly 0..{size - 1}")
            tokens[idx] = tok
        for added in data.get("added_tokens") or []:
            if added.get("id", 0) >= size:
                raise VinaSmolError(f"{file}: added token {added.get('content')!r} has id {added.get('id')} "
                                    f"beyond the BPE vocabulary ({size}); not supported")
        merges = parse_merges(model.get("merges") or [], str(file))
        return cls(path=file, data=data, tokens=tokens,  # type: ignore[arg-type]
                   merges=merges, sha256=hashlib.sha256(raw).hexdigest())

    def missing_byte_symbols(self) -> list[str]:
        """Byte-level symbols of bytes that UTF-8 text can contain (all but C0, C1, F5..FF) and
        that the vocabulary lacks. The BPE model silently drops such bytes (SmolLM2 lacks eight:
        six control characters and the lead bytes F1, F2)."""
        vocab = set(self.tokens)
        table = bytes_to_unicode()
        return [table[b] for b in range(256)
                if table[b] not in vocab and b not in (0xC0, 0xC1) and b < 0xF5]

    def added_contents(self) -> set[str]:
        return {t.get("content", "") for t in self.data.get("added_tokens") or []}

    def model_tokenizer(self, tokens: list[str] | None = None,
                        merges: list[tuple[str, str]] | None = None) -> Any:
        """A Rust tokenizer that runs only this BPE model (optionally with more tokens and merges)
        on words given one per whitespace-separated field: byte-level strings never hold
        whitespace, so the WhitespaceSplit is exact."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        spec = self.data["model"]
        toks = tokens if tokens is not None else self.tokens
        bpe = models.BPE(
            vocab={t: i for i, t in enumerate(toks)},
            merges=list(merges if merges is not None else self.merges),
            unk_token=spec.get("unk_token"),
            fuse_unk=bool(spec.get("fuse_unk", False)),
            byte_fallback=bool(spec.get("byte_fallback", False)),
        )
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return tok


def encode_words(tokenizer: Any, words: list[str], chunk_words: int = 20000) -> list[list[int]]:
    """Token ids of each byte-level word under a model-only tokenizer (see `model_tokenizer`),
    encoded in parallel by the Rust library, many words per call."""
    import numpy as np

    texts = [" ".join(words[i:i + chunk_words]) for i in range(0, len(words), chunk_words)]
    out: list[list[int]] = []
    for enc, start in zip(tokenizer.encode_batch(texts, add_special_tokens=False),
                          range(0, len(words), chunk_words), strict=True):
        n = min(chunk_words, len(words) - start)
        wids = np.asarray(enc.word_ids, dtype=np.int64)  # no special tokens: never None
        b = np.searchsorted(wids, np.arange(n + 1)).tolist()
        ids = enc.ids
        out.extend(ids[b[i]:b[i + 1]] for i in range(n))
    return out
