"""Cheap per-document cleaning: normalisation and a few documented filters (see CleaningSpec)."""

from __future__ import annotations

import unicodedata

import numpy as np
import xxhash

from vinasmol_core.data.spec import CleaningSpec

# C0 controls except tab and newline, DEL, and C1 controls. CR is handled before this runs.
_CONTROL_CODES = [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]
_IS_CONTROL = np.zeros(0x110000, dtype=bool)  # by code point
_IS_CONTROL[_CONTROL_CODES] = True
_DROP_CONTROL = dict.fromkeys(_CONTROL_CODES)  # str.translate table deleting them
# What str.split() splits on (no code point above U+3000 is whitespace)
_IS_SPACE = np.zeros(0x110000, dtype=bool)
_IS_SPACE[[c for c in range(0x3001) if chr(c).isspace()]] = True
_VI_LETTERS = (
    "àáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđ"
)
_IS_VI_LETTER = np.zeros(0x110000, dtype=bool)  # by code point
_IS_VI_LETTER[[ord(c) for c in _VI_LETTERS + _VI_LETTERS.upper()]] = True
_NON_LETTER_BYTES = bytes(b for b in range(128) if not chr(b).isalpha())

FILTERS = ("empty", "too_short", "repeated_lines", "script")


def codepoints(text: str) -> np.ndarray:
    """The text's code points as a uint32 array (lone surrogates kept as they are)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def normalize_text(text: str) -> str:
    """CR/CRLF to LF, control characters (other than tab and newline) removed, Unicode NFC."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _IS_CONTROL[codepoints(text)].any():
        text = text.translate(_DROP_CONTROL)
    if text.startswith("\ufeff"):
        text = text[1:]
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def repeated_line_fraction(text: str) -> tuple[float, int]:
    """(fraction of non-empty lines that repeat an earlier line, number of non-empty lines)."""
    lines = text.split("\n")
    n = len(lines) - lines.count("")
    if n == 0:
        return 0.0, 0
    unique = len(set(lines)) - (1 if "" in lines else 0)
    return 1.0 - unique / n, n


def vietnamese_script_fractions(text: str, sample_chars: int) -> tuple[float, float]:
    """(Latin fraction, Vietnamese-diacritic fraction) over the ASCII letters and non-ASCII characters
    of a prefix of `text`. Latin: ASCII letters and Vietnamese letters; every other non-ASCII
    character (other scripts, typographic punctuation) counts against it."""
    sample = text[:sample_chars]
    ascii_part = sample.encode("ascii", "ignore")
    n_ascii_letters = len(ascii_part.translate(None, _NON_LETTER_BYTES))
    n_other = len(sample) - len(ascii_part)
    n_vi = int(np.count_nonzero(_IS_VI_LETTER[codepoints(sample)])) if n_other else 0
    total = n_ascii_letters + n_other
    if total == 0:
        return 0.0, 0.0
    return (n_ascii_letters + n_vi) / total, n_vi / total


def clean_document(text: str, lang: str, spec: CleaningSpec) -> tuple[str | None, str | None]:
    """(cleaned text, None) when the document is kept, else (None, name of the filter that removed it)."""
    if spec.normalize:
        text = normalize_text(text)
    stripped_len = len(text.strip())
    if stripped_len == 0:
        return None, "empty"
    if stripped_len < spec.min_chars:
        return None, "too_short"
    if spec.max_repeated_line_fraction is not None and lang != "code":
        frac, n = repeated_line_fraction(text)
        if n >= spec.min_lines_for_repeat and frac > spec.max_repeated_line_fraction:
            return None, "repeated_lines"
    if spec.vi_script_check and lang == "vi":
        latin, diacritic = vietnamese_script_fractions(text, spec.script_sample_chars)
        if latin < spec.vi_min_latin_fraction or diacritic < spec.vi_min_diacritic_fraction:
            return None, "script"
    return text, None


def dedup_hash(text: str) -> int:
    """The 64-bit hash exact deduplication compares: of the text with its whitespace runs collapsed to
    one space and its ends stripped (the form `" ".join(text.split())`), as UTF-32 code points."""
    codes = codepoints(text)
    space = _IS_SPACE[codes]
    keep = ~space
    keep[1:] |= ~space[:-1]  # a whitespace run's first character stays (as a space) unless it leads
    canonical = np.where(space, np.uint32(0x20), codes)[keep]
    if canonical.size and space[-1]:  # a trailing run left one space
        canonical = canonical[:-1]
    return xxhash.xxh3_64_intdigest(canonical.tobytes())
