"""Curation settings: quality heuristics per language, PII redaction and encoding repair (see curate.py).

Every filter has `enabled` and its thresholds; each language (`vi`, `en`, `code`, `any`) has its own set,
so a recipe tunes Vietnamese without touching English. A language's settings given in a recipe are
merged onto that language's defaults, field by field: `vi: {gopher_quality: {min_words: 80}}` changes
one number and keeps every other Vietnamese default.

Where the defaults come from:
- C4 (Raffel et al. 2020, arXiv 1910.10683, section 2.2) as FineWeb applied it (datatrove's
  `C4QualityFilter` with `filter_no_terminal_punct=False`): lines of fewer than 3 words, lines naming
  javascript or a cookie/terms policy, and Wikipedia-style citations are cut; a document with
  "lorem ipsum" or a curly bracket, or with fewer than 5 sentences left, is dropped.
- Gopher quality and repetition (Rae et al. 2021, arXiv 2112.11446, section A.1.1 and table A1).
- FineWeb's line rules (Penedo et al. 2024, arXiv 2406.17557, section 3.3): the share of lines ending in
  terminal punctuation, of short lines, of characters in duplicated lines, and newlines per word.
- Vietnamese: FineWeb-2 (Penedo et al. 2025, arXiv 2506.20920) sets each language's thresholds from that
  language's data; its `vie_Latn` config gives the stop words, `dup_line_frac` 0.293, the n-gram
  repetition fractions, `line_punct_thr` 0.333, `new_line_ratio` 0.103 and an alpha-word share of
  0.803. FineWeb-2 counts words with a Vietnamese word segmenter; here words are what `str.split`
  gives, i.e. syllables, so the word-length bounds are set the FineWeb-2 way, from the distribution on
  Vietnamese Wikipedia, for syllables: a Vietnamese syllable (punctuation attached, as Gopher counts)
  averages 3.78 characters against 4.55 for an English word on the Wikipedia and Gutenberg text this
  project benchmarks on, so Gopher's English bounds of 3-10 scale by 3.78/4.55 to 2.5-8.3.
- `code`: no prose rule (they would drop most source files); encoding repair runs, and PII redaction with
  only its code-safe rules (e-mail addresses with a known top-level domain; no IP addresses).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_VI_STOP_WORDS = ("là", "và", "của", "một", "được", "trong", "năm", "các", "có", "loài", "này", "đã", "người")
_EN_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True


class C4Rules(_Rules):
    """C4's line and page rules."""

    line_end_punct: bool = False  # C4 keeps only lines ending in . ! ? " ' (FineWeb turned this off)
    min_words_per_line: int | None = Field(3, ge=1)
    max_word_chars: int | None = Field(1000, ge=1)  # a line with a longer word is cut
    min_sentences: int | None = Field(5, ge=1)
    remove_citations: bool = True  # [1], [edit], [citation needed]
    lorem_ipsum: bool = True
    curly_bracket: bool = True
    javascript_lines: bool = True
    policy_lines: bool = True


class GopherQualityRules(_Rules):
    """Gopher's quality rules, on words split at whitespace (syllables for Vietnamese)."""

    min_words: int | None = Field(50, ge=1)  # words with a character that is not punctuation
    max_words: int | None = Field(100_000, ge=1)
    min_avg_word_chars: float | None = Field(3.0, gt=0)
    max_avg_word_chars: float | None = Field(10.0, gt=0)
    max_symbol_word_ratio: float | None = Field(0.1, ge=0)  # '#' and ellipses per word
    max_bullet_lines: float | None = Field(0.9, ge=0, le=1)
    max_ellipsis_lines: float | None = Field(0.3, ge=0, le=1)
    min_alpha_words: float | None = Field(0.8, ge=0, le=1)  # share of words with a letter
    min_stop_words: int | None = Field(2, ge=1)  # distinct stop words present
    stop_words: tuple[str, ...] = _EN_STOP_WORDS


class GopherRepetitionRules(_Rules):
    """Gopher's repetition rules (table A1): fractions of lines, paragraphs and characters repeated."""

    dup_line_frac: float | None = Field(0.3, ge=0, le=1)
    dup_para_frac: float | None = Field(0.3, ge=0, le=1)
    dup_line_char_frac: float | None = Field(0.2, ge=0, le=1)
    dup_para_char_frac: float | None = Field(0.2, ge=0, le=1)
    top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_ngrams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                  (10, 0.10))


class FineWebRules(_Rules):
    """FineWeb's line rules."""

    min_line_punct: float | None = Field(0.12, ge=0, le=1)  # share of lines ending in terminal punctuation
    short_line_chars: int = Field(30, ge=1)
    max_short_lines: float | None = Field(0.67, ge=0, le=1)
    max_dup_line_chars: float | None = Field(0.01, ge=0, le=1)  # characters in repeated lines
    max_newlines_per_word: float | None = Field(0.3, ge=0)


class FlaggedWordsRules(_Rules):
    """Drop documents where flagged words (or phrases) make more than `max_ratio` of the words.

    The list is a UTF-8 file of one word or phrase a line (`#` starts a comment), matched lower-cased
    on whole words; `words` adds entries inline. Off until a list is given: none ships with the project."""

    enabled: bool = False
    path: str | None = None
    words: tuple[str, ...] = ()
    max_ratio: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _has_list(self) -> FlaggedWordsRules:
        if self.enabled and not self.path and not self.words:
            raise ValueError("flagged_words is enabled but gives no list: "
                             "set path (a word list file) or words")
        return self


class LangCuration(BaseModel):
    """The quality filters of one language, applied in this order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gopher_repetition: GopherRepetitionRules = GopherRepetitionRules()
    gopher_quality: GopherQualityRules = GopherQualityRules()
    c4: C4Rules = C4Rules()
    fineweb: FineWebRules = FineWebRules()
    flagged_words: FlaggedWordsRules = FlaggedWordsRules()


class PIIRules(_Rules):
    """Email addresses and public IP addresses (IPv4, IPv6) replaced by placeholders. An address must
    look like one where it stands: not a version or section number, a slice or a matrix product. In
    `code` sources IP addresses stay unless `ips_in_code` (there they are constants: networks,
    examples, test data) and an e-mail address needs a known top-level domain."""

    emails: bool = True
    ips: bool = True
    ips_in_code: bool = False
    email_placeholder: str = "<email>"
    ip_placeholder: str = "<ip>"


class EncodingRules(_Rules):
    """Mojibake (UTF-8 decoded as Latin-1 or Windows-1252, ...) repaired with ftfy's encoding fixes only
    (no quote, width or ligature changes); NFC follows in the normalisation."""


_OFF = {"enabled": False}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "vi": {
        "gopher_repetition": {"dup_line_frac": 0.293,
                              "top_ngrams": [[2, 0.223], [3, 0.197], [4, 0.171]],
                              "dup_ngrams": [[5, 0.178], [6, 0.163], [7, 0.15], [8, 0.136], [9, 0.124],
                                             [10, 0.111]]},
        "gopher_quality": {"min_avg_word_chars": 2.5, "max_avg_word_chars": 8.3, "min_alpha_words": 0.803,
                           "stop_words": list(_VI_STOP_WORDS)},
        "fineweb": {"min_line_punct": 0.333, "max_newlines_per_word": 0.103},
    },
    "en": {},
    "code": {"gopher_repetition": _OFF, "gopher_quality": _OFF, "c4": _OFF, "fineweb": _OFF},
    "any": {"gopher_quality": _OFF, "c4": _OFF},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def language_defaults(lang: str) -> LangCuration:
    """The default filters of a language (vi, en, code or any)."""
    return LangCuration.model_validate(_DEFAULTS[lang])


class CurationSpec(BaseModel):
    """Curation before deduplication: encoding repair, then per-language quality filters, then PII
    redaction. `enabled: false` turns all of it off; each filter has its own `enabled`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    encoding: EncodingRules = EncodingRules()
    pii: PIIRules = PIIRules()
    vi: LangCuration = Field(default_factory=lambda: language_defaults("vi"))
    en: LangCuration = Field(default_factory=lambda: language_defaults("en"))
    code: LangCuration = Field(default_factory=lambda: language_defaults("code"))
    any: LangCuration = Field(default_factory=lambda: language_defaults("any"))

    @model_validator(mode="before")
    @classmethod
    def _onto_language_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for lang, defaults in _DEFAULTS.items():
            given = out.get(lang)
            if isinstance(given, dict):
                base = LangCuration.model_validate(defaults).model_dump(mode="python")
                out[lang] = _merge(base, given)
        return out

    def for_lang(self, lang: str) -> LangCuration:
        return getattr(self, lang)
