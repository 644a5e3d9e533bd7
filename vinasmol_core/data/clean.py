"""Cheap per-document cleaning: normalisation and a few documented filters (see CleaningSpec)."""

from __future__ import annotations

import re
import unicodedata

from vinasmol_core.data.spec import CleaningSpec

# C0 controls except tab and newline, DEL, and C1 controls. CR is handled before this runs.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_VI_LETTERS = (
    "àáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđ"
)
_VI_RE = re.compile(f"[{_VI_LETTERS}{_VI_LETTERS.upper()}]")
_NON_LETTER_BYTES = bytes(b for b in range(128) if not chr(b).isalpha())

FILTERS = ("empty", "too_short", "repeated_lines", "script")


def normalize_text(text: str) -> str:
    """CR/CRLF to LF, control characters (other than tab and newline) removed, Unicode NFC."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROL_RE.search(text):
        text = _CONTROL_RE.sub("", text)
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
    n_vi = len(_VI_RE.findall(sample)) if n_other else 0
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


def dedup_key(text: str) -> bytes:
    """The normalised form exact deduplication hashes: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split()).encode("utf-8")
