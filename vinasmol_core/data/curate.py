"""Curation of one document before deduplication: encoding repair, quality filters, PII redaction.

The rules are those of C4, Gopher and FineWeb (see curation.py for the sources and the thresholds);
words are what `str.split` gives (syllables in Vietnamese). Where this code counts differently from
datatrove's filters it says so:
- C4 keeps blank lines (datatrove's join drops them, and with them the paragraph breaks) and counts a
  kept line's sentences as its runs of terminal punctuation followed by a space or its end (at least
  one per line) instead of running a sentence splitter.
- Gopher's duplicated n-gram fraction is the characters of the words that lie inside any occurrence of
  an n-gram seen earlier in the document, each word counted once (datatrove skips ahead greedily).
- A word is punctuation only when every character is punctuation or a symbol (Unicode P* or S*).

`Curator` holds one spec (and the flagged-word lists) and is built once per worker process.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.data.clean import _IS_SPACE, codepoints
from vinasmol_core.data.curation import (
    C4Rules,
    CurationSpec,
    FineWebRules,
    FlaggedWordsRules,
    GopherQualityRules,
    GopherRepetitionRules,
)

if TYPE_CHECKING:
    from vinasmol_core.data.spec import SourceStats

QUALITY_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb", "flagged_words")
EDITS = ("encoding", "pii")  # change documents, never remove them
CURATION_FILTERS = (*QUALITY_FILTERS, *EDITS)

TERMINAL = (".", "!", "?", "…", "。", "！", "？", "．", "｡", "؟", "।", "॥", "‼", "‽", "⁇", "⁈", "⁉")
_C4_END = (".", "?", "!", '"', "'")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’»)\]]*(?=\s|$)")
_LETTER_RUNS = re.compile(r"[^\W\d_]+")
# Mojibake shows a lead byte of a multi-byte UTF-8 sequence read as Latin-1 or Windows-1252 (U+00C2 to
# U+00F4) followed by a continuation byte so read (U+0080 to U+00BF, or Windows-1252's 0x80-0x9F)
_IS_CONTINUATION = np.zeros(0x110000, dtype=bool)
_IS_CONTINUATION[0x80:0xC0] = True
_UNDEFINED_IN_CP1252 = (0x81, 0x8D, 0x8F, 0x90, 0x9D)
_IS_CONTINUATION[[ord(bytes([b]).decode("cp1252")) for b in range(0x80, 0xA0)
                  if b not in _UNDEFINED_IN_CP1252]] = True
# An e-mail address: a dot-separated local part, then host labels and an alphabetic top-level domain
# (one case) that ends the name: `q@k.transpose(...)` (a call) and `x@self.weight.T` (an attribute
# after it) are matrix products, not addresses.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([a-z]{2,63}|[A-Z]{2,63}))"
    r"(?![\w-]|\.[\w-]|\s*\()")
# In code an address needs a known top-level domain too: any two letters (a country) or a common
# generic one (`h@self.proj` is a product)
_CODE_TLDS = frozenset(
    "com org net edu gov mil int info biz name pro mobi aero coop museum arpa io ai dev app cloud tech "
    "online site xyz club email local localdomain invalid example test".split())
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Four octets that are not part of a longer dotted number or host name (`1.2.3.4.5`, `v2.6.32.1`,
# `1.0.0.127.in-addr.arpa`, `section-7.1.1.1`) nor a network (`224.0.0.0/4`)
_IPV4 = re.compile(rf"(?<![\w.-])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w-]|\.\w|/\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){3,7}[0-9A-Fa-f]{1,4}(?![\w:])"
                   r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}(?![\w:])")
# A dotted quad that follows one of these words in the same clause, at most six words back, numbers a
# version or a section: "phiên bản ổn định chính thức 1.0.154.36", "Mục 5.4.3.2", "section 7.1.1.1"
_NUMBERING_CUE = re.compile(
    r"(?<!\w)(?:v|ver|version|versions|release|releases|kernel|section|sections|sec|chapter|clause|"
    r"article|paragraph|appendix|annex|figure|fig|phiên bản|mục|điều|khoản|chương|tiết|phụ lục|hình)"
    r"(?!\w)|§", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.;!?](?:\s|$)|\n")
_CUE_WORDS = 6
# ... or that opens a line as an outline number ("2.1.1.1. Định lượng", "8.2.4.44 Bogus comment")
_OUTLINE_AFTER = re.compile(r"[.)]\s|[ \t]+[^\W\d_]")
# Cheap searches that every match of the regexes above contains (they skip most documents at once)
_IPV4_HINT = re.compile(r"\.[0-9]+\.[0-9]+\.[0-9]")
_IPV6_HINT = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Outcome:
    """What curation did to a document: `text` None when a filter removed it (`filter`, `rule`), else the
    text to keep; `edits` names the filters that changed it, with bytes they cut."""

    text: str | None
    filter: str | None = None
    rule: str = ""
    edits: dict[str, int] | None = None


def load_flagged_words(rules: FlaggedWordsRules, where: str) -> frozenset[str]:
    """The lower-cased, NFC word list of `rules` (file and inline words); ConfigError naming `where`."""
    words = list(rules.words)
    if rules.path:
        try:
            text = Path(rules.path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}.path: cannot read word list {rules.path}: {exc}") from None
        words += [line.split("#", 1)[0] for line in text.splitlines()]
    out = frozenset(" ".join(unicodedata.normalize("NFC", w).lower().split()) for w in words)
    out = out - {""}
    if rules.enabled and not out:
        raise ConfigError(f"{where}: the word list is empty")
    return out


def _table(predicate: Callable[[str], bool]) -> np.ndarray:
    """A bool per code point, from the predicate on planes 0-3 (surrogates and later planes False)."""
    table = np.zeros(0x110000, dtype=bool)
    for lo, hi in ((0, 0xD800), (0xE000, 0x40000)):
        table[lo:hi] = np.fromiter(map(predicate, map(chr, range(lo, hi))), dtype=bool, count=hi - lo)
    return table


_IS_PUNCT = _table(lambda ch: unicodedata.category(ch)[0] in "PS")  # punctuation or symbol
_IS_LETTER = _table(str.isalpha)
# Letters count 1, punctuation and symbols 2**32: one gather and one sum per word give both counts
_CLASS = _IS_LETTER.astype(np.int64) + (_IS_PUNCT.astype(np.int64) << 32)
_HASH_BASE = np.uint64(0x100000001B3)
_HASH_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_POW: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # powers of the base, its inverse


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if _POW[0].size < n:
        size = max(n, 2 * _POW[0].size)
        for i, base in enumerate((_HASH_BASE, _HASH_INV)):
            p = np.full(size, base, dtype=np.uint64)
            p[0] = 1
            _POW[i] = np.cumprod(p, dtype=np.uint64)
    return _POW[0][:n], _POW[1][:n]


class _Doc:
    """A document's words (runs of non-space, as `str.split` cuts them) as arrays, computed once for all
    rules: start and end offsets, lengths, a 64-bit hash of each word, and its letters and non-punctuation
    characters."""

    def __init__(self, text: str, lazy: bool = False) -> None:
        self.text = text
        self._n_words: int | None = None
        self._ready = False
        if not lazy:
            self._arrays()

    def _arrays(self) -> None:
        self._ready = True
        cps = codepoints(self.text)
        space = _IS_SPACE[cps]
        nonspace = ~space
        edge = np.diff(nonspace.view(np.int8), prepend=0, append=0)
        self.starts = np.flatnonzero(edge == 1)
        self.ends = np.flatnonzero(edge == -1)
        self._n_words = int(self.starts.size)
        self.lens = self.ends - self.starts
        self._cps = cps
        self._hashes: np.ndarray | None = None

    def __getattr__(self, name: str) -> np.ndarray:  # the arrays of a lazy document, on first use
        if name.startswith("__") or self.__dict__.get("_ready", True):
            raise AttributeError(name)
        self._arrays()
        return getattr(self, name)

    @property
    def n_words(self) -> int:
        if self._n_words is None:
            self._n_words = len(self.text.split())
        return self._n_words

    def letters_and_punct(self) -> tuple[np.ndarray, np.ndarray]:
        """Per word: how many of its characters are letters, and how many punctuation or symbols."""
        if self.n_words == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        sums = np.add.reduceat(_CLASS[self._cps], self.starts)  # a word and the spaces after it
        return sums & 0xFFFFFFFF, sums >> 32

    @property
    def hashes(self) -> np.ndarray:
        """A polynomial hash of each word's code points (equal words, equal hashes)."""
        if self._hashes is None:
            pw, inv = _powers(self._cps.size + 1)
            terms = self._cps.astype(np.uint64) * pw[:-1]
            prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)))
            self._hashes = (prefix[self.ends] - prefix[self.starts]) * inv[self.starts]
        return self._hashes


@functools.lru_cache(maxsize=16)
def _stop_hashes(words: tuple[str, ...]) -> np.ndarray:
    return np.array([word_hash(w) for w in words], dtype=np.uint64)


def word_hash(word: str) -> int:
    """The hash `_Doc.hashes` gives `word`."""
    return int(_Doc(word).hashes[0]) if word.strip() else 0


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier one, their characters)."""
    if len(set(items)) == len(items):
        return 0, 0
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


class _NGrams:
    """Hashes of a document's word n-grams, each n built once from the (n-1)-grams."""

    def __init__(self, words: np.ndarray) -> None:
        self.words = words
        self.by_n = {1: words}

    def get(self, n: int) -> np.ndarray | None:
        if n > self.words.size:
            return None
        k = max(m for m in self.by_n if m <= n)
        h = self.by_n[k]
        for m in range(k + 1, n + 1):
            h = h[:-1] * _HASH_MUL + self.words[m - 1 :]
            self.by_n[m] = h
        return h


def _top_word_mass(hashes: np.ndarray, lens: np.ndarray) -> int:
    """At least the largest count x (length + 1) of a word of the document: the words are summed in 4096
    buckets by hash (words sharing a bucket only raise the bound)."""
    return int(np.bincount((hashes & np.uint64(4095)).astype(np.intp), weights=lens + 1).max())


def _top_ngram_chars(h: np.ndarray, lens: np.ndarray, n: int) -> int:
    """Characters of the most frequent n-gram (words and the spaces between them) times its count."""
    s = np.sort(h)
    change = np.flatnonzero(s[1:] != s[:-1])
    bounds = np.concatenate(([0], change + 1, [s.size]))
    runs = np.diff(bounds)
    top = int(np.argmax(runs))
    count = int(runs[top])
    if count < 2:
        return 0
    start = int(np.flatnonzero(h == s[bounds[top]])[0])
    return (int(lens[start : start + n].sum()) + n - 1) * count


def _repeat_coverage(h: np.ndarray, lens: np.ndarray, n: int) -> int:
    """Characters of the words inside an n-gram occurrence whose n-gram occurred earlier."""
    order = np.argsort(h)
    sorted_h = h[order]
    new_run = np.empty(h.size, dtype=bool)
    new_run[0] = True
    np.not_equal(sorted_h[1:], sorted_h[:-1], out=new_run[1:])
    if new_run.all():
        return 0
    run_starts = np.flatnonzero(new_run)
    first = np.minimum.reduceat(order, run_starts)  # each n-gram's first position
    repeat = np.zeros(h.size, dtype=bool)
    repeat[order[order != first[np.cumsum(new_run) - 1]]] = True
    starts = np.concatenate(([0], np.cumsum(repeat)))
    j = np.arange(lens.size)
    covered = starts[np.minimum(j + 1, h.size)] - starts[np.maximum(j - n + 1, 0).clip(max=h.size)] > 0
    return int(lens[covered].sum())


def gopher_repetition(doc: _Doc, r: GopherRepetitionRules) -> str | None:
    text = doc.text
    total = len(text)
    if total == 0:
        return "empty"
    if r.dup_para_frac is not None or r.dup_para_char_frac is not None:
        body = text.strip()
        paragraphs = list(filter(None, (p.strip("\n") for p in body.split("\n\n")))) if "\n\n" in body \
            else [body]
        n, chars = _duplicates(paragraphs)
        if r.dup_para_frac is not None and n / len(paragraphs) > r.dup_para_frac:
            return f"dup_para_frac {n / len(paragraphs):.2f} > {r.dup_para_frac}"
        if r.dup_para_char_frac is not None and chars / total > r.dup_para_char_frac:
            return f"dup_para_char_frac {chars / total:.2f} > {r.dup_para_char_frac}"
    if r.dup_line_frac is not None or r.dup_line_char_frac is not None:
        lines = list(filter(None, text.split("\n")))
        n, chars = _duplicates(lines)
        if r.dup_line_frac is not None and n / len(lines) > r.dup_line_frac:
            return f"dup_line_frac {n / len(lines):.2f} > {r.dup_line_frac}"
        if r.dup_line_char_frac is not None and chars / total > r.dup_line_char_frac:
            return f"dup_line_char_frac {chars / total:.2f} > {r.dup_line_char_frac}"
    if doc.n_words < 2 or not (r.top_ngrams or r.dup_ngrams):
        return None
    grams = _NGrams(doc.hashes)
    lens = doc.lens
    # An n-gram occurs at most as often as each of its words: its characters times its count are at
    # most n times the largest (count x (length + 1)) of a word. Below every threshold: no sort needed.
    word_mass = 0
    if r.top_ngrams:
        word_mass = _top_word_mass(doc.hashes, lens)
    for n, frac in r.top_ngrams:
        if n * word_mass / total <= frac:
            continue
        h = grams.get(n)
        if h is None:
            continue
        chars = _top_ngram_chars(h, lens, n)
        if chars / total > frac:
            return f"top_{n}_gram {chars / total:.2f} > {frac}"
    floor = min((f for _, f in r.dup_ngrams), default=1.0)
    for n, frac in sorted(r.dup_ngrams):
        h = grams.get(n)
        if h is None:
            continue
        chars = _repeat_coverage(h, lens, n)
        if chars / total > frac:
            return f"dup_{n}_gram {chars / total:.2f} > {frac}"
        if chars / total <= floor:  # an n-gram repeats only where its shorter prefix does: none can fail
            break
    return None


def gopher_quality(doc: _Doc, r: GopherQualityRules, stop_hashes: np.ndarray | None = None) -> str | None:
    text = doc.text
    n_words = doc.n_words
    if n_words == 0:
        return "no words"
    letters, punct = doc.letters_and_punct()
    symbol_only = punct == doc.lens
    n = n_words - int(np.count_nonzero(symbol_only))
    if r.min_words is not None and n < r.min_words:
        return f"words {n} < {r.min_words}"
    if r.max_words is not None and n > r.max_words:
        return f"words {n} > {r.max_words}"
    if n and (r.min_avg_word_chars is not None or r.max_avg_word_chars is not None):
        avg = int(doc.lens[~symbol_only].sum()) / n
        if r.min_avg_word_chars is not None and avg < r.min_avg_word_chars:
            return f"mean word length {avg:.2f} < {r.min_avg_word_chars}"
        if r.max_avg_word_chars is not None and avg > r.max_avg_word_chars:
            return f"mean word length {avg:.2f} > {r.max_avg_word_chars}"
    if r.max_symbol_word_ratio is not None:
        if text.count("#") / n_words > r.max_symbol_word_ratio:
            return f"'#' per word > {r.max_symbol_word_ratio}"
        if (text.count("...") + text.count("…")) / n_words > r.max_symbol_word_ratio:
            return f"ellipses per word > {r.max_symbol_word_ratio}"
    lines = text.splitlines()
    if r.max_bullet_lines is not None and ("•" in text or "-" in text):
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > r.max_bullet_lines:
            return f"bullet lines {bullets / len(lines):.2f} > {r.max_bullet_lines}"
    if r.max_ellipsis_lines is not None and ("..." in text or "…" in text):
        ends = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ends / len(lines) > r.max_ellipsis_lines:
            return f"ellipsis lines {ends / len(lines):.2f} > {r.max_ellipsis_lines}"
    if r.min_alpha_words is not None:
        alpha = np.count_nonzero(letters) / n_words
        if alpha < r.min_alpha_words:
            return f"words with a letter {alpha:.2f} < {r.min_alpha_words}"
    if r.min_stop_words is not None:
        if stop_hashes is None:
            stop_hashes = _stop_hashes(r.stop_words)
        found = int(np.count_nonzero((doc.hashes[:, None] == stop_hashes[None, :]).any(axis=0))) \
            if stop_hashes.size else 0
        if found < r.min_stop_words:
            return f"stop words {found} < {r.min_stop_words}"
    return None


def c4(text: str, r: C4Rules) -> tuple[str | None, str]:
    """(text with C4's lines cut, ""), or (None, the rule) when the page goes."""
    if r.remove_citations and "[" in text:
        text = _CITATION.sub("", text)
    lower = text.lower()
    check_lorem = r.lorem_ipsum and "lorem ipsum" in lower
    check_js = r.javascript_lines and "javascript" in lower
    check_policy = r.policy_lines and any(p in lower for p in _POLICY)
    check_curly = r.curly_bracket and "{" in text
    kept: list[str] = []
    sentences = 0
    need = r.min_sentences or 0
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept.append(line)
            continue
        if r.max_word_chars is not None and len(stripped) > r.max_word_chars \
                and max(map(len, stripped.split())) > r.max_word_chars:
            continue
        if r.line_end_punct and (not stripped.endswith(_C4_END) or stripped.endswith("...")):
            continue
        if r.min_words_per_line is not None and len(stripped.split(None, r.min_words_per_line - 1)) \
                < r.min_words_per_line:
            continue
        if check_lorem or check_js or check_policy:
            low = stripped.lower()
            if check_lorem and "lorem ipsum" in low:
                return None, "lorem ipsum"
            if check_js and "javascript" in low:
                continue
            if check_policy and any(p in low for p in _POLICY):
                continue
        if check_curly and "{" in stripped:
            return None, "curly bracket"
        if sentences < need:
            sentences += max(1, len(_SENTENCE_END.findall(stripped)))
        kept.append(line)
    if sentences < need:
        return None, f"sentences {sentences} < {need}"
    return "\n".join(kept).strip("\n"), ""


def fineweb(doc: _Doc, r: FineWebRules) -> str | None:
    text = doc.text
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "no lines"
    if r.min_line_punct is not None:
        ratio = sum(1 for line in lines if line.endswith(TERMINAL)) / len(lines)
        if ratio < r.min_line_punct:
            return f"lines ending in punctuation {ratio:.2f} < {r.min_line_punct}"
    if r.max_short_lines is not None:
        ratio = sum(1 for line in lines if len(line) <= r.short_line_chars) / len(lines)
        if ratio > r.max_short_lines:
            return f"short lines {ratio:.2f} > {r.max_short_lines}"
    if r.max_dup_line_chars is not None:
        ratio = _duplicates(lines)[1] / max(1, len(text) - text.count("\n"))
        if ratio > r.max_dup_line_chars:
            return f"characters in repeated lines {ratio:.3f} > {r.max_dup_line_chars}"
    if r.max_newlines_per_word is not None:
        ratio = text.count("\n") / max(1, doc.n_words)
        if ratio > r.max_newlines_per_word:
            return f"newlines per word {ratio:.2f} > {r.max_newlines_per_word}"
    return None


def flagged_ratio(text: str, flagged: frozenset[str]) -> float:
    """Share of the text's words (runs of letters, lower-cased) inside a flagged word or phrase."""
    words = _LETTER_RUNS.findall(text.lower())
    if not words:
        return 0.0
    hits = sum(map(flagged.__contains__, words))
    for size in {len(p.split()) for p in flagged} - {1}:
        grams = map(" ".join, zip(*(words[i:] for i in range(size)), strict=False))
        hits += size * sum(map(flagged.__contains__, grams))
    return hits / len(words)


def _is_global(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:
        return False


def _is_numbering(text: str, start: int, end: int) -> bool:
    """Whether the dotted quad at text[start:end] numbers a version, a section or an outline item."""
    line_start = text.rfind("\n", 0, start) + 1
    before = text[max(line_start, start - 80) : start]
    after = _OUTLINE_AFTER.match(text, end)
    opens_line = not before.strip(" \t#*-\"'“(")
    if opens_line and after and (after.group(0)[0] in ".)" or after.group(0)[-1].isupper()):
        return True
    clause = _CLAUSE_END.split(before)[-1]
    return bool(_NUMBERING_CUE.search(" ".join(clause.split()[-_CUE_WORDS:])))


def _redact_ipv4(match: re.Match[str], placeholder: str) -> str:
    """The placeholder for a public IPv4 address that is not a version, section or outline number."""
    address = match.group(0)
    if not _is_global(address) or _is_numbering(match.string, match.start(), match.end()):
        return address
    return placeholder


def _redact_ipv6(match: re.Match[str], placeholder: str) -> str:
    """The placeholder for a public IPv6 address. A shortened one (`::`) needs three groups written out:
    with fewer it reads as a slice (`x[1::2]`, `buf[4096::4]`)."""
    address = match.group(0)
    if "::" in address and len([g for g in address.split(":") if g]) < 3:
        return address
    return placeholder if _is_global(address) else address


def _redact_email(match: re.Match[str], placeholder: str, code: bool) -> str:
    tld = match.group(2).lower()
    if code and len(tld) != 2 and tld not in _CODE_TLDS:
        return match.group(0)
    return placeholder


class Curator:
    """One curation spec ready to run: `repair` before normalisation, `filter` and `redact` after it."""

    def __init__(self, spec: CurationSpec, flagged: dict[str, frozenset[str]] | None = None) -> None:
        self.spec = spec
        self.flagged = flagged or {}
        self.stop_hashes = {
            lang: np.array([word_hash(w) for w in spec.for_lang(lang).gopher_quality.stop_words], np.uint64)
            for lang in ("vi", "en", "code", "any")}
        self._ftfy_config = None
        if spec.enabled and spec.encoding.enabled:
            import ftfy

            self._ftfy = ftfy
            self._ftfy_config = ftfy.TextFixerConfig(
                unescape_html=False, remove_terminal_escapes=False, fix_latin_ligatures=False,
                fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
                remove_control_chars=False, normalization=None, explain=False)

    def repair(self, text: str) -> str:
        """The text with its mojibake repaired (unchanged when it shows none)."""
        if self._ftfy_config is None or text.isascii():
            return text
        cps = codepoints(text)
        lead = (cps[:-1] >= 0xC2) & (cps[:-1] <= 0xF4)
        if not (lead & _IS_CONTINUATION[cps[1:]]).any():
            return text
        return self._ftfy.fix_text(text, self._ftfy_config)

    def filter(self, text: str, lang: str) -> Outcome:
        """Run the language's quality filters in order; C4 may cut lines (an edit), the others remove."""
        if not self.spec.enabled:
            return Outcome(text)
        rules = self.spec.for_lang(lang)
        doc = _Doc(text)
        edits: dict[str, int] = {}
        for name in QUALITY_FILTERS:
            r = getattr(rules, name)
            if not r.enabled:
                continue
            if name == "c4":
                new, rule = c4(doc.text, r)
                if new is None:
                    return Outcome(None, name, rule)
                if new != doc.text:
                    edits[name] = _utf8_len(doc.text) - _utf8_len(new)
                    doc = _Doc(new, lazy=True)
                continue
            if name == "flagged_words":
                ratio = flagged_ratio(doc.text, self.flagged.get(lang, frozenset()))
                rule = f"flagged words {ratio:.3f} > {r.max_ratio}" if ratio > r.max_ratio else None
            elif name == "gopher_quality":
                rule = gopher_quality(doc, r, self.stop_hashes[lang])
            else:
                rule = gopher_repetition(doc, r) if name == "gopher_repetition" else fineweb(doc, r)
            if rule is not None:
                return Outcome(None, name, rule)
        return Outcome(doc.text, edits=edits or None)

    def redact(self, text: str, lang: str | None = None) -> str:
        """E-mail addresses and public IP addresses replaced by the placeholders. In `code` an e-mail
        address needs a known top-level domain, and IP addresses stay unless `pii.ips_in_code`."""
        pii = self.spec.pii
        if not (self.spec.enabled and pii.enabled):
            return text
        code = lang == "code"
        if pii.emails and "@" in text:
            text = _EMAIL.sub(lambda m: _redact_email(m, pii.email_placeholder, code), text)
        if pii.ips and (pii.ips_in_code or not code):
            if _IPV4_HINT.search(text):
                text = _IPV4.sub(lambda m: _redact_ipv4(m, pii.ip_placeholder), text)
            if _IPV6_HINT.search(text):
                text = _IPV6.sub(lambda m: _redact_ipv6(m, pii.ip_placeholder), text)
        return text


def filter_table(sources: Iterable[tuple[str, str, SourceStats]]) -> list[dict[str, Any]]:
    """One row per (source, filter) that removed or edited documents, with its first examples."""
    rows = []
    for name, lang, stats in sources:
        for fname, f in sorted(stats.filters.items()):
            examples = " | ".join(f"[{e['rule']}] {e['id']}: {' '.join(e['text'].split())[:80]}"
                                  for e in f.examples)
            rows.append({"source": name, "lang": lang, "filter": fname, "docs removed": f.docs,
                         "MB removed": round(f.bytes / 1e6, 3), "docs edited": f.edited,
                         "MB cut": round(f.edited_bytes / 1e6, 3), "examples": examples})
    return rows


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))
