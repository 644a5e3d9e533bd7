"""An exact fast path for GPT-2-style byte-level BPE tokenizers (SmolLM2 and its extensions).

The encoding runs in tiktoken's compiled BPE (no Python work per word), driven by the tokenizer's
own pre-tokenizer regex and merge list, and the ids are mapped back to the tokenizer's.

Why it is exact. tiktoken merges, at each step, the adjacent pair whose concatenation has the
lowest rank; the tokenizer merges the adjacent pair that comes first in its merge list. Give each
token the rank of the merge that makes it. While tiktoken only performs pairs that are in the
merge list, it performs the same merges in the same order (the pair it picks is the tokenizer's
first candidate, leftmost first in both). Suppose its first other merge joins x and y into the token
t = x + y. Up to then both ran alike, and x, y cover exactly the bytes of t, so the tokenizer run
on t's bytes alone goes through the same merges inside that span and also reaches [x, y], where it
stops (the only pair is not a merge): t is *unreachable*, never produced by the tokenizer. So
leaving unreachable tokens out of tiktoken's ranks (the tokenizer can neither output them nor build
on them) makes the two agree on every input. `create` checks every token's reachability with the
tokenizer's own BPE model, and requires every byte that UTF-8 text can hold to be a token (the
tokenizer drops unknown bytes and lets their neighbours merge; tiktoken cannot do that).

Skipping the regex's lookahead. The pattern's alternative "whitespace not followed by a non-space"
makes tiktoken's regex engine backtrack, and costs about 40% of the encoding time on Wikipedia
text. Without it, the pattern differs only on a run of two or more whitespace characters followed
by a character the lookahead rejects (any non-space; with isolated digits, any non-space
non-digit): the original splits off the run's last character, to lead the next piece, while the
plain whitespace alternative takes the whole run. Cutting the text before that last character and
encoding the pieces separately without the lookahead gives the original's pre-tokens: the
original has a pre-token boundary at every cut, and its pre-tokens never look back past their own
start. The runs are found with a table lookup over the text's code points. With isolated digits,
where a character after such a run has no Unicode category in Python's tables (newer than Python's
Unicode data: the regex may know it as a number), or where pieces would be short (indented code: one
call per piece costs more than the backtracking), the text is encoded with the full pattern instead.

When it is used. Only for tokenizer.json files of exactly that shape: a BPE model without dropout,
subword affixes or `ignore_merges`, each merge making a new token, no normaliser (or NFC), and a
ByteLevel pre-tokenizer with the GPT-2 regex and no prefix space, optionally preceded by
Digits(individual_digits=True). A text containing an added token's content goes to the real
tokenizer whole. `prepare_dataset` also compares the two on samples of every source and rebuilds
with the real tokenizer alone if they ever disagree.
"""

from __future__ import annotations

import array
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from vinasmol_core.data.clean import codepoints

# The regex's \s, spelled out (Oniguruma's Unicode \s: tab to CR, NEL, and the space, line and
# paragraph separators), so Python's wider idea of whitespace (it adds U+001C..U+001F) never leaks in.
_WS_CODES = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
             0x205F, 0x3000]
_WS = "".join(map(chr, _WS_CODES))
_GPT2 = (f"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{{L}}+| ?\\p{{N}}+| ?[^{_WS}\\p{{L}}\\p{{N}}]+"
         f"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
# GPT-2's regex applied between isolated digits: a digit is a match of its own and ends the
# segment, so "whitespace not followed by non-space" also holds before a digit.
_GPT2_DIGITS = (f"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{{L}}+| ?[^{_WS}\\p{{L}}\\p{{N}}]+"
                f"|[{_WS}]+(?![^{_WS}\\p{{N}}])|[{_WS}]+|\\p{{N}}")
# The same two without the lookahead alternative (see "Skipping the regex's lookahead").
_GPT2_PLAIN_WS = _GPT2.replace(f"|[{_WS}]+(?![^{_WS}])", "")
_GPT2_DIGITS_PLAIN_WS = _GPT2_DIGITS.replace(f"|[{_WS}]+(?![^{_WS}\\p{{N}}])", "")
_IS_WS = np.zeros(0x110000, dtype=bool)  # by code point
_IS_WS[_WS_CODES] = True
_UNUSED_SPECIAL = "<|vinasmol:unused|>"
# Below this many characters per piece on average, the text is encoded whole with the full pattern.
MIN_PIECE_CHARS = 20
# Bytes that never occur in UTF-8 text.
_NOT_UTF8 = frozenset({0xC0, 0xC1, *range(0xF5, 0x100)})


def fast_path_shape(tokenizer_json: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """(reason the fast path does not apply or None, digits isolated, NFC normaliser)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return "model is not BPE", False, False
    if model.get("dropout") not in (None, 0, 0.0):
        return "BPE dropout", False, False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "subword prefix/suffix", False, False
    if model.get("ignore_merges"):
        return "ignore_merges (whole words looked up before merging)", False, False
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


@dataclass(frozen=True)
class BPETables:
    """What the fast path takes from a tokenizer.json (small, picklable: built once per prepare and
    sent to every worker process)."""

    tokenizer_json: str
    ranks: dict[bytes, int]  # tiktoken's mergeable ranks: reachable tokens, in merge order
    rank_to_id: list[int]
    digits: bool
    nfc: bool
    added: list[str]  # added tokens' contents

    @classmethod
    def build(cls, tokenizer: Any, tokenizer_json: Path) -> BPETables | None:
        """None when the tokenizer's shape is not supported (see the module docstring)."""
        # here, not at the top: worker processes import this module but never build tables
        from vinasmol_core.tokenizer.text import bytes_to_unicode, unicode_to_bytes

        data = orjson.loads(Path(tokenizer_json).read_bytes())
        reason, digits, nfc = fast_path_shape(data)
        if reason is not None:
            return None
        vocab: dict[str, int] = data["model"]["vocab"]
        byte_chars = bytes_to_unicode()
        to_latin1 = str.maketrans(unicode_to_bytes())  # then each char is its byte
        if any(byte_chars[b] not in vocab for b in range(256) if b not in _NOT_UTF8):
            return None
        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        rank_to_id = [vocab.get(byte_chars[b], 0) for b in range(256)]  # 0: a byte UTF-8 text never holds
        tokenize = tokenizer.model.tokenize
        for merge in data["model"].get("merges", []):
            left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
            token = left + right
            key = token.translate(to_latin1).encode("latin-1")
            if key in ranks or token not in vocab:
                return None  # a merge that remakes a token: the rank order would not be the merge order
            produced = tokenize(token)
            if len(produced) != 1 or produced[0].id != vocab[token]:
                continue  # unreachable: the tokenizer never produces it (see the module docstring)
            ranks[key] = len(rank_to_id)
            rank_to_id.append(vocab[token])
        added = [t["content"] for t in data.get("added_tokens", []) if t.get("content")]
        return cls(str(tokenizer_json), ranks, rank_to_id, digits, nfc, added)


class FastByteLevelBPE:
    """Encodes texts exactly like `tokenizer.encode_batch(texts, add_special_tokens=False)`, faster.

    Build with `FastByteLevelBPE(BPETables.build(...), dtype)`, or `FastByteLevelBPE.create(tokenizer,
    tokenizer_json_path, dtype)`, which returns None when the tokenizer's shape is not supported."""

    def __init__(self, tables: BPETables, dtype: np.dtype[Any], tokenizer: Any = None) -> None:
        import tiktoken

        patterns = (_GPT2_DIGITS, _GPT2_DIGITS_PLAIN_WS) if tables.digits else (_GPT2, _GPT2_PLAIN_WS)
        # One special token, never allowed (text holding it is encoded as ordinary text): without any,
        # tiktoken's encode_to_numpy searches with an empty pattern and runs twice as slow.
        special = {_UNUSED_SPECIAL: max(tables.ranks.values()) + 1}
        self.encoding, self.plain_ws = (  # the full pattern; without its lookahead, for cut pieces
            tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=tables.ranks, special_tokens=special)
            for name, pattern in zip(("vinasmol-bpe", "vinasmol-bpe-plain-ws"), patterns, strict=True)
        )
        self.tables = tables
        self.cut_whitespace_runs = True  # False: every text with the full pattern (benchmarks compare)
        self.min_piece_chars = MIN_PIECE_CHARS
        self.dtype = np.dtype(dtype)
        self.rank_to_id = np.array(tables.rank_to_id, dtype=self.dtype)
        self._tokenizer = tokenizer  # loaded when first needed: for texts holding an added token
        longest_first = sorted(tables.added, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    @classmethod
    def create(cls, tokenizer: Any, tokenizer_json: Path, dtype: np.dtype[Any]) -> FastByteLevelBPE | None:
        tables = BPETables.build(tokenizer, tokenizer_json)
        return None if tables is None else cls(tables, dtype, tokenizer)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.tables.tokenizer_json)
        return self._tokenizer

    def _cuts(self, text: str) -> list[int] | None:
        """Where to cut `text` so that its pieces can be encoded without the lookahead: before the last
        character of every run of two or more whitespace characters that the lookahead splits. None
        when the full pattern must be used instead (see the module docstring)."""
        codes = codepoints(text)
        ws = _IS_WS[codes]
        # i is the last character of a run of >= 2 and text[i + 1] is not whitespace
        cuts = np.flatnonzero(ws[:-2] & ws[1:-1] & ~ws[2:]) + 1
        if self.tables.digits and cuts.size:
            after = codes[cuts + 1]
            keep = (after < 0x30) | (after > 0x39)  # the lookahead accepts a digit: no split before one
            for j in np.flatnonzero(keep & (after > 0x7F)).tolist():
                category = unicodedata.category(text[cuts[j] + 1])
                if category == "Cn":  # unknown to Python's tables; the regex may know it as a number
                    return None
                keep[j] = category[0] != "N"
            cuts = cuts[keep]
        if cuts.size * self.min_piece_chars > len(text):
            return None
        return cuts.tolist()

    def _ranks(self, text: str) -> np.ndarray:
        """tiktoken ranks of one text: cut where `_cuts` says, each piece encoded without the lookahead."""
        cuts = self._cuts(text) if self.cut_whitespace_runs else None
        if cuts is None or not cuts:
            encoding = self.encoding if cuts is None else self.plain_ws
            return encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        encode, ranks, start = self.plain_ws.encode_ordinary, [], 0  # many short pieces: lists are cheaper
        for cut in cuts:
            ranks += encode(text[start:cut])
            start = cut
        ranks += encode(text[start:])
        return np.frombuffer(array.array("I", ranks), dtype=np.uint32)  # 3x faster than np.array(list)

    def encode(self, texts: list[str], eos_id: int, *,
               texts_are_nfc: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts concatenated, each followed by eos_id; per-text lengths including eos).
        `texts_are_nfc` skips the NFC check of a tokenizer with an NFC normaliser."""
        parts: list[np.ndarray] = []
        eos = np.array([eos_id], dtype=self.dtype)
        to_ids = self.rank_to_id
        check_nfc = self.tables.nfc and not texts_are_nfc
        for text in texts:
            if self._added is not None and self._added.search(text):
                ids = np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=self.dtype)
            else:
                if check_nfc and not unicodedata.is_normalized("NFC", text):
                    text = unicodedata.normalize("NFC", text)
                ids = to_ids[self._ranks(text)]
            parts.append(ids)
            parts.append(eos)
        lengths = np.fromiter((p.size + 1 for p in parts[::2]), dtype=np.int64, count=len(texts))
        flat = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        return flat, lengths
