"""An exact, cached fast path for GPT-2-style byte-level BPE tokenizers (SmolLM2 and its extensions).

Why it is exact. Such a tokenizer pre-splits text with GPT-2's regex (after isolating every digit,
in SmolLM2's case), then runs BPE inside each piece, so the ids of a text are the concatenation
of the ids of its pre-tokens. In that regex no match runs from a non-whitespace character into
whitespace (whitespace only ever starts a match) and nothing looks behind, so wherever whitespace
follows a non-whitespace character a new match begins, and the matches from there on depend only
on the text from there on. Cutting a document at every such point therefore gives pieces whose
encodings concatenate to the document's encoding. Pieces (" Nội,", " the", "\\n    return")
repeat a lot: each distinct piece is encoded once and cached. A new piece is split into
pre-tokens with the same regex (the `regex` package), and each distinct pre-token is encoded
once by the real tokenizer.

When it is used. Only for tokenizer.json files of exactly that shape: a BPE model without dropout
or subword affixes, no normaliser (or NFC), and a ByteLevel pre-tokenizer with the GPT-2 regex and
no prefix space, optionally preceded by Digits(individual_digits=True). A text containing an added
token's content goes to the real tokenizer whole. `prepare_dataset` also compares the two on
samples of every source and rebuilds with the real tokenizer alone if they ever disagree.
"""

from __future__ import annotations

import json
import re
import unicodedata
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

# The regex's \s, spelled out (Oniguruma's Unicode \s: tab to CR, NEL, and the space, line and
# paragraph separators), so Python's wider idea of whitespace (it adds U+001C..U+001F) never leaks in.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A piece starts wherever whitespace follows a non-whitespace character: no pre-token spans that
# point, and the pre-tokens after it depend only on the text after it. So a piece is a run of
# whitespace then a run of non-whitespace (or the trailing whitespace of the text).
_PIECE = re.compile(f"[{_WS}]*[^{_WS}]+|[{_WS}]+")
_GPT2 = (f"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{{L}}+| ?\\p{{N}}+| ?[^{_WS}\\p{{L}}\\p{{N}}]+"
         f"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
# GPT-2's regex applied between isolated digits: a digit is a match of its own and ends the
# segment, so "whitespace not followed by non-space" also holds before a digit.
_GPT2_DIGITS = (f"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{{L}}+| ?[^{_WS}\\p{{L}}\\p{{N}}]+"
                f"|[{_WS}]+(?![^{_WS}\\p{{N}}])|[{_WS}]+|\\p{{N}}")
_CACHE_LIMIT = 400_000


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table (the ByteLevel pre-tokenizer's alphabet), by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()


def fast_path_shape(tokenizer_json: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """(reason the fast path does not apply or None, digits isolated, NFC normaliser)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return "model is not BPE", False, False
    if model.get("dropout") not in (None, 0, 0.0):
        return "BPE dropout", False, False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "subword prefix/suffix", False, False
    norm = tokenizer_json.get("normalizer")
    nfc = False
    if norm is not None:
        parts = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        if any(p.get("type") != "NFC" for p in parts):
            return "normaliser other than NFC", False, False
        nfc = bool(parts)
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    digits = False
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
        digits = True
        steps = steps[1:]
    if len(steps) != 1 or steps[0].get("type") != "ByteLevel":
        return "pre-tokenizer is not [Digits(individual)] + ByteLevel", False, False
    byte_level = steps[0]
    if byte_level.get("add_prefix_space") or not byte_level.get("use_regex", True):
        return "ByteLevel with prefix space or without regex", False, False
    return None, digits, nfc


class FastByteLevelBPE:
    """Encodes texts exactly like `tokenizer.encode_batch(texts, add_special_tokens=False)`, faster.

    Build with `FastByteLevelBPE.create(tokenizer, tokenizer_json_path, dtype)`, which returns None
    when the tokenizer's shape is not supported. Cached piece encodings are kept as raw bytes of
    `dtype`, so a document's ids are one `bytes.join` of its pieces' (no per-token Python work)."""

    def __init__(
        self, tokenizer: Any, digits: bool, nfc: bool, added: list[str], dtype: np.dtype[Any]
    ) -> None:
        import regex

        self.tokenizer = tokenizer
        self.nfc = nfc
        self.dtype = np.dtype(dtype)
        self._pretok = regex.compile(_GPT2_DIGITS if digits else _GPT2)
        self._added = re.compile("|".join(re.escape(a) for a in sorted(added, key=len, reverse=True))) \
            if added else None
        self._pieces: dict[str, bytes] = {}
        self._words: dict[str, bytes] = {}

    @classmethod
    def create(cls, tokenizer: Any, tokenizer_json: Path, dtype: np.dtype[Any]) -> FastByteLevelBPE | None:
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        reason, digits, nfc = fast_path_shape(data)
        if reason is not None:
            return None
        added = [t["content"] for t in data.get("added_tokens", []) if t.get("content")]
        return cls(tokenizer, digits, nfc, added, dtype)

    def _encode_words(self, words: list[str]) -> None:
        """Cache the ids of new pre-tokens: the BPE model run on their byte-level characters, which
        is what the tokenizer does after pre-tokenizing (and about twice as fast as encoding)."""
        tokenize = self.tokenizer.model.tokenize
        chars = _BYTE_CHARS.__getitem__
        ids = [[t.id for t in tokenize("".join(map(chars, w.encode("utf-8"))))] for w in words]
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype).tobytes()
        size = self.dtype.itemsize
        pos = 0
        for w, x in zip(words, ids, strict=True):
            n = len(x) * size
            self._words[w] = flat[pos : pos + n]
            pos += n

    def _encode_pieces(self, pieces: set[str]) -> None:
        """Cache the ids of new pieces: regex pre-tokens, each distinct one encoded once."""
        findall = self._pretok.findall
        split = {p: findall(unicodedata.normalize("NFC", p) if self.nfc else p) for p in pieces}
        words = self._words
        new_words = list({w for ws in split.values() for w in ws if w not in words})
        if new_words:
            self._encode_words(new_words)
        join = b"".join
        for p, ws in split.items():
            self._pieces[p] = words[ws[0]] if len(ws) == 1 else join(map(words.__getitem__, ws))

    def encode(self, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts concatenated, each followed by eos_id; per-text lengths including eos)."""
        if len(self._pieces) > _CACHE_LIMIT:  # bounded memory; only between batches
            self._pieces.clear()
        if len(self._words) > _CACHE_LIMIT:
            self._words.clear()
        split = _PIECE.findall
        cache = self._pieces
        added = self._added
        slow = [i for i, t in enumerate(texts) if added is not None and added.search(t)]
        piece_lists = [split(t) for t in texts] if not slow else \
            [split(t) if added is None or not added.search(t) else [] for t in texts]
        distinct: set[str] = set()
        for pieces in piece_lists:
            distinct.update(pieces)
        missing = distinct.difference(cache)  # C-level: set minus dict keys
        if missing:
            self._encode_pieces(missing)
        join = b"".join
        getter = cache.__getitem__
        bufs = [join(map(getter, pieces)) for pieces in piece_lists]
        if slow:
            encs = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encs, strict=True):
                bufs[i] = np.array(e.ids, dtype=self.dtype).tobytes()
        size = self.dtype.itemsize
        lengths = np.fromiter((len(b) // size + 1 for b in bufs), dtype=np.int64, count=len(bufs))
        eos = np.array([eos_id], dtype=self.dtype).tobytes()
        flat = np.frombuffer(join(chain.from_iterable((b, eos) for b in bufs)), dtype=self.dtype)
        return flat, lengths
