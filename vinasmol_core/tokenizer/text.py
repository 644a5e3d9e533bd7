"""Text helpers shared by the tokenizer code: NFC as the tokenizer does it, the GPT-2 byte alphabet,
whitespace as the pre-tokenizer sees it, and a test for Vietnamese letters."""

from __future__ import annotations

import re
from functools import lru_cache

# Unicode White_Space, which is what `\s` means in the Rust regex of the ByteLevel pre-tokenizer.
# (Python's str.isspace() also counts U+001C..U+001F, which the pre-tokenizer treats as symbols.)
WHITESPACE_CLASS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A document cut into segments: a whitespace run and the non-space run after it (or trailing space).
SEGMENT_RE = re.compile(f"[{WHITESPACE_CLASS}]*[^{WHITESPACE_CLASS}]+|[{WHITESPACE_CLASS}]+")
LEADING_SPACE_RE = re.compile(f"[{WHITESPACE_CLASS}]")
NONSPACE_RE = re.compile(f"[^{WHITESPACE_CLASS}]+")

# Letters only Vietnamese uses among Latin scripts: the vowels with breve, circumflex and horn, đ,
# and the precomposed tone-marked letters (Latin Extended Additional U+1EA0..U+1EF9), plus ĩ/ũ.
VIETNAMESE_LETTERS = frozenset(
    "ăâđêôơưĂÂĐÊÔƠƯĩũĨŨ" + "".join(chr(c) for c in range(0x1EA0, 0x1EFA))
)


# A pure-Python copy of the GPT-2 ByteLevel split, exact on a restricted alphabet where every
# character's class is unambiguous: ASCII, and the Latin letters of U+00C0..U+024F (less the
# signs x and /) and U+1E00..U+1EFF (Vietnamese lives here). Other text goes to the Rust code.
_LATIN_LETTERS = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
SIMPLE_ALPHABET_RE = re.compile(f"[\t-\r -~{_LATIN_LETTERS[6:]}]*")
_GPT2_SIMPLE_RE = re.compile(
    f"'s|'t|'re|'ve|'m|'ll|'d| ?[{_LATIN_LETTERS}]+| ?[0-9]+| ?[^\\s{_LATIN_LETTERS}0-9]+|\\s+(?!\\S)|\\s+"
)
_DIGIT_SPLIT_RE = {"individual": re.compile("([0-9])"), "grouped": re.compile("([0-9]+)")}
_BYTE_TABLE: dict[int, str] = {}


def simple_pieces(segment: str, digits: str | None) -> list[str] | None:
    """The raw-text pieces that GPT-2's ByteLevel split makes of `segment`, after a Digits
    pre-tokenizer when `digits` is "individual" or "grouped"; None when the segment leaves the
    restricted alphabet (then ask the Rust pre-tokenizer)."""
    if SIMPLE_ALPHABET_RE.fullmatch(segment) is None:
        return None
    if digits is None:
        return _GPT2_SIMPLE_RE.findall(segment)
    out: list[str] = []
    for i, part in enumerate(_DIGIT_SPLIT_RE[digits].split(segment)):
        if i % 2:
            out.append(part)
        elif part:
            out.extend(_GPT2_SIMPLE_RE.findall(part))
    return out


def to_byte_level(text: str) -> str:
    """`text` in the byte-level alphabet (each UTF-8 byte as one printable character)."""
    if not _BYTE_TABLE:
        _BYTE_TABLE.update({b: c for b, c in bytes_to_unicode().items()})
    return text.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)


@lru_cache(maxsize=1)
def _nfc_normalizer():  # noqa: ANN202
    from tokenizers import normalizers

    return normalizers.NFC()


def nfc(text: str) -> str:
    """NFC exactly as the extended tokenizer's own normaliser computes it.

    Python's `unicodedata` (Unicode 14 in 3.11) and the tables inside `tokenizers` disagree on a
    few dozen combining marks added in recent Unicode versions; using the tokenizer's own NFC keeps
    our pipeline's ids identical to what a transformers user gets from raw text."""
    if text.isascii():
        return text
    return _nfc_normalizer().normalize_str(text)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def byte_level_to_text(token: str) -> str:
    """The text a byte-level token stands for (invalid UTF-8 fragments shown with U+FFFD)."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in token).decode("utf-8", errors="replace")
