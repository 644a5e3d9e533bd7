"""Typed inputs and outputs of data preparation: sources, cleaning rules, build settings, long-context
view, result."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.data.curation import CurationSpec
from vinasmol_core.data.documents import DocumentFormat

Lang = Literal["vi", "en", "code", "any"]
Role = Literal["main", "annealing"]
LANGS: tuple[str, ...] = ("vi", "en", "code", "any")
ROLES: tuple[str, ...] = ("main", "annealing")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SourceSpec(BaseModel):
    """One corpus: local files or globs, fsspec URLs (s3://...), or a `datasets` dataset by name.

    `paths` entries are read as JSON Lines (.jsonl/.json/.ndjson, optionally .gz/.bz2/.xz/.zst),
    Parquet (.parquet) or plain text (.txt/.md/.py/..., one document per file). `lang` tags the
    language (vi, en, code or any); `role` says whether the source feeds the main mixture or the
    annealing mixture; `text_field` (and `id_field`, when present) name the record fields, unless
    `document` renders conversation or instruction rows as text (`vinasmol_core.data.documents`; a
    `datasets` source only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    lang: Lang
    role: Role = "main"
    paths: tuple[str, ...] = ()
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_revision: str | None = None
    hf_data_files: tuple[str, ...] = ()
    hf_streaming: bool = True
    hf_path: str | None = None
    """Where `load_dataset` reads `hf_dataset` from when not the hub (a hub mirror folder)."""
    max_docs: int | None = Field(None, gt=0)
    """Budget of a `datasets` source: stop after this many documents."""
    max_bytes: int | None = Field(None, gt=0)
    """Budget of a `datasets` source: stop once this many UTF-8 bytes of text were read."""
    max_tokens: int | None = Field(None, gt=0)
    """Budget of a `datasets` source in kept tokens: read on until this many training tokens are left
    after cleaning, curation and deduplication (the data step; `max_bytes`, when given, is what is
    expected to be read, and reading stops at `READ_ON_FACTOR` times it)."""
    text_field: str = "text"
    id_field: str | None = "id"
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    document: DocumentFormat | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME_RE.match(name) or name in LANGS or name in ROLES:
            raise ValueError(
                f"source name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                f"and not a language tag or role ({', '.join(LANGS + ROLES)})"
            )
        return name

    @model_validator(mode="after")
    def _one_origin(self) -> SourceSpec:
        if bool(self.paths) == bool(self.hf_dataset):
            raise ValueError(f"source {self.name!r}: give either paths or hf_dataset (exactly one)")
        if self.paths and self.document is not None:
            raise ValueError(f"source {self.name!r}: document (conversation rows) needs hf_dataset")
        if self.paths and (self.max_docs or self.max_bytes or self.max_tokens or self.hf_path):
            raise ValueError(f"source {self.name!r}: max_docs, max_bytes, max_tokens and hf_path need "
                             "hf_dataset")
        return self

    def columns(self) -> list[str]:
        """The record fields a document is made of: the `document` format's columns, or `text_field`."""
        return self.document.columns() if self.document is not None else [self.text_field]

    @classmethod
    def parse_cli(cls, text: str, *, text_field: str = "text", id_field: str | None = "id") -> SourceSpec:
        """Parse `NAME:LANG[:ROLE]=PATH_OR_GLOB[,PATH_OR_GLOB...]`.

        A location `hf:DATASET[:CONFIG][@SPLIT]` names a `datasets` dataset (streamed)."""
        head, sep, location = text.partition("=")
        if not sep or not location:
            raise ConfigError(f"--source {text!r}: expected NAME:LANG[:ROLE]=PATH_OR_GLOB")
        parts = head.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"--source {text!r}: expected NAME:LANG[:ROLE] before '='")
        name, lang = parts[0], parts[1]
        role = parts[2] if len(parts) == 3 else "main"
        if lang not in LANGS:
            raise ConfigError(f"--source {text!r}: language {lang!r} is not one of {', '.join(LANGS)}")
        if role not in ROLES:
            raise ConfigError(f"--source {text!r}: role {role!r} is not one of {', '.join(ROLES)}")
        fields: dict[str, Any] = {"name": name, "lang": lang, "role": role, "text_field": text_field,
                                  "id_field": id_field}
        if location.startswith("hf:"):
            ds, _, split = location[3:].partition("@")
            ds_name, _, config = ds.partition(":")
            fields.update(hf_dataset=ds_name, hf_config=config or None, hf_split=split or "train")
        else:
            fields["paths"] = tuple(p for p in location.split(",") if p)
        try:
            return cls(**fields)
        except ValueError as exc:
            raise ConfigError(f"--source {text!r}: {_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            return str(errs[0].get("msg", exc)).removeprefix("Value error, ")
    return str(exc)


class CleaningSpec(BaseModel):
    """Light cleaning, applied in this order to every document.

    1. Normalisation (always counted, never removes): CR/CRLF to LF, control characters other than
       tab and newline removed, Unicode NFC.
    2. `empty`: nothing but whitespace left.
    3. `too_short`: fewer than `min_chars` characters after stripping.
    4. `repeated_lines` (prose sources only, not `code`): among at least `min_lines_for_repeat`
       non-empty lines, more than `max_repeated_line_fraction` of them repeat an earlier line.
    5. `script` (sources tagged `vi` only): in the first `script_sample_chars` characters, fewer than
       `vi_min_latin_fraction` of the letters are Latin (ASCII or Vietnamese letters), or fewer than
       `vi_min_diacritic_fraction` of them carry Vietnamese diacritics (đ, ă, â, ê, ô, ơ, ư and tones).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    normalize: bool = True
    min_chars: int = Field(32, ge=0)
    max_repeated_line_fraction: float | None = Field(0.3, ge=0.0, le=1.0)
    min_lines_for_repeat: int = Field(4, ge=1)
    vi_script_check: bool = True
    vi_min_latin_fraction: float = Field(0.8, ge=0.0, le=1.0)
    vi_min_diacritic_fraction: float = Field(0.03, ge=0.0, le=1.0)
    script_sample_chars: int = Field(4096, ge=64)


@dataclass(frozen=True)
class PrepareSettings:
    """How `prepare_dataset` builds a dataset (the sources and the tokenizer are its other inputs).

    The cleaning, split, dedup and shard settings are part of the dataset's key; the others change
    only how the build runs. Values are used as given (no coercion), so the key stays stable."""

    cleaning: CleaningSpec = field(default_factory=CleaningSpec)
    """Normalisation and filters applied to every document."""
    curation: CurationSpec | None = None
    """Encoding repair, quality filters per language and PII redaction, before dedup (None: none)."""
    val_fraction: float = 0.01
    """Share of documents sent to the validation split, in [0, 1), by a stable hash of (source, id)."""
    dedup: bool = True
    """Drop exact duplicates (after cleaning) across all sources, keeping the first seen."""
    near_dedup: bool = False
    """Also drop near-duplicates found by MinHash LSH over word 5-grams."""
    near_dedup_threshold: float = 0.8
    """Estimated Jaccard similarity, in (0, 1], from which a document counts as a near-duplicate."""
    skip_bad_lines: bool = False
    """Skip (and count) JSONL lines that are not UTF-8 JSON objects instead of failing."""
    shard_tokens: int = 1 << 25
    """Tokens per shard file (at least 1024)."""
    batch_chars: int = 1 << 21
    """Characters of raw input per batch handed to a worker."""
    workers: int | None = None
    """Worker processes; None: one per core (at most 8), none for small local inputs; 0: in-process."""
    use_fast_path: bool = True
    """Tokenize with the table-driven encoder (checked on samples against the tokenizer's own)."""


class LongContextSpec(BaseModel):
    """Up-sample long documents within each source (Gao et al. 2024, "How to train long-context LMs").

    A training window whose first token lies in a document of at least `min_doc_tokens` tokens
    (default: the sampler's sequence length) is drawn `factor` times as often as other windows of
    the same source. Source weights of the mixture are unchanged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factor: float = Field(4.0, ge=1.0)
    min_doc_tokens: int | None = Field(None, ge=1)


class FilterStats(BaseModel):
    """What one filter did to a source: documents it removed and their UTF-8 bytes, documents it edited
    (and the bytes it cut from them), and up to three short examples (`id`, `rule`, `text`)."""

    docs: int = 0
    bytes: int = 0
    edited: int = 0
    edited_bytes: int = 0
    examples: list[dict[str, str]] = Field(default_factory=list)

    def merge(self, other: FilterStats, max_examples: int = 3) -> None:
        self.docs += other.docs
        self.bytes += other.bytes
        self.edited += other.edited
        self.edited_bytes += other.edited_bytes
        self.examples.extend(other.examples[: max(0, max_examples - len(self.examples))])


class SourceStats(BaseModel):
    """What happened to one source's documents (`removed`: documents per filter; `filters`: the same
    with bytes, edits and examples, for every filter that removed or changed something)."""

    docs_read: int = 0
    bytes_read: int = 0
    bad_lines_skipped: int = 0
    removed: dict[str, int] = Field(default_factory=dict)
    filters: dict[str, FilterStats] = Field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    train_docs: int = 0
    val_docs: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    planned_tokens: int | None = None
    """The source's token budget (None: none); `train_tokens` is what it really gave."""


class DatasetInfo(BaseModel):
    """The result of `prepare_dataset`: where the dataset is and what it holds."""

    key: str
    dir: Path | None = None
    reused: bool = False
    manifest_digest: str | None = None
    tokenizer_digest: str
    vocab_size: int
    dtype: str
    token_counts: dict[str, int]
    sources: dict[str, SourceStats]
    seconds: float = 0.0
