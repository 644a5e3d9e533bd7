"""Fertility: tokens per whitespace word and bytes per token, per language, for any tokenizers.

Words are `len(text.split())` (whitespace-separated words), bytes are UTF-8 bytes of the text as
stored; tokens are what each tokenizer.json gives without special tokens. Optionally the report
also gives the pre-tokenizer floor: pieces per word after the tokenizer's own pre-tokenizer.
No BPE vocabulary, however large, can go below it (a token never spans two pieces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.tokenizer.base import tokenizer_file
from vinasmol_core.tokenizer.corpus import batched_by_chars, expand_paths, iter_file

BATCH_CHARS = 1_000_000


class FertilityCell(BaseModel):
    tokens: int
    tokens_per_word: float
    bytes_per_token: float


class LanguageStats(BaseModel):
    files: list[str]
    documents: int = 0
    words: int = 0
    bytes: int = 0
    floor_tokens_per_word: float | None = None


@dataclass
class FertilityReport:
    """Fertility of several tokenizers on several languages (see `fertility_report`)."""

    tokenizers: dict[str, str]
    languages: dict[str, LanguageStats]
    cells: dict[str, dict[str, FertilityCell]] = field(default_factory=dict)  # lang -> tokenizer -> cell

    def to_json(self) -> dict[str, Any]:
        return {
            "definition": "tokens_per_word = tokens / len(text.split()); "
                          "bytes_per_token = UTF-8 bytes / tokens",
            "tokenizers": dict(self.tokenizers),
            "languages": {
                lang: {**stats.model_dump(), "tokenizers": {name: c.model_dump() for name, c in
                                                              self.cells.get(lang, {}).items()}}
                for lang, stats in self.languages.items()
            },
        }

    def _columns(self) -> tuple[list[str], list[list[str]]]:
        names = list(self.tokenizers)
        header = ["language", "words"]
        header += [f"{n} tok/word" for n in names]
        header += [f"{n} bytes/tok" for n in names]
        if len(names) == 2:
            header.append(f"{names[1]} vs {names[0]}")
        if any(s.floor_tokens_per_word is not None for s in self.languages.values()):
            header.append("floor tok/word")
        rows: list[list[str]] = []
        for lang, stats in self.languages.items():
            cells = self.cells.get(lang, {})
            row = [lang, f"{stats.words:,}"]
            row += [f"{cells[n].tokens_per_word:.3f}" for n in names]
            row += [f"{cells[n].bytes_per_token:.3f}" for n in names]
            if len(names) == 2:
                a, b = cells[names[0]].tokens, cells[names[1]].tokens
                row.append(f"{(b - a) / a:+.1%}" if a else "n/a")
            if "floor tok/word" in header:
                f = stats.floor_tokens_per_word
                row.append(f"{f:.3f}" if f is not None else "")
            rows.append(row)
        return header, rows

    def to_markdown(self) -> str:
        header, rows = self._columns()
        lines = ["| " + " | ".join(header) + " |",
                 "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def to_rich_table(self) -> Any:
        from rich.table import Table

        header, rows = self._columns()
        table = Table(title="Tokenizer fertility (tokens per whitespace word, bytes per token)")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*r)
        return table


def _load(path: Path) -> Any:
    from tokenizers import Tokenizer

    file = tokenizer_file(Path(path))
    if not file.is_file():
        raise VinaSmolError(f"tokenizer {file} does not exist")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:
        raise VinaSmolError(f"{file}: cannot load tokenizer ({exc})") from None


def fertility_report(tokenizers: dict[str, Path], files: dict[str, list[Path]], *,
                     floor: bool = False, text_field: str = "text") -> FertilityReport:
    """Measure every tokenizer (name -> folder or tokenizer.json) on every language's files
    (lang -> JSONL / Parquet / text files). `floor`: also count pieces per word after the last
    tokenizer's pre-tokenizer (the lower bound of any BPE with that pre-tokenizer)."""
    if not tokenizers:
        raise VinaSmolError("fertility report: no tokenizer given")
    if not files:
        raise VinaSmolError("fertility report: no data files given")
    loaded = {name: _load(path) for name, path in tokenizers.items()}
    names = {name: str(tokenizer_file(Path(p))) for name, p in tokenizers.items()}
    languages: dict[str, LanguageStats] = {}
    cells: dict[str, dict[str, FertilityCell]] = {}
    for lang, paths in files.items():
        expanded = expand_paths(paths)
        stats = LanguageStats(files=[str(p) for p in expanded])
        totals = dict.fromkeys(loaded, 0)
        texts = (text for path in expanded for text in iter_file(path, text_field))
        for batch in batched_by_chars(texts, BATCH_CHARS):
            stats.documents += len(batch)
            stats.words += sum(len(t.split()) for t in batch)
            stats.bytes += sum(len(t.encode("utf-8")) for t in batch)
            for name, tok in loaded.items():
                totals[name] += sum(len(e) for e in tok.encode_batch(batch, add_special_tokens=False))
        if stats.words == 0:
            raise VinaSmolError(f"fertility report: the {lang} files hold no words "
                                f"({', '.join(stats.files)})")
        if floor:
            from vinasmol_core.tokenizer.counts import count_words

            last = list(tokenizers.values())[-1]
            counts = count_words(expanded, text_field, pre_tokenizer=Path(last))
            stats.floor_tokens_per_word = counts.stats.words / stats.words
        cells[lang] = {
            name: FertilityCell(tokens=n, tokens_per_word=n / stats.words,
                                bytes_per_token=stats.bytes / n if n else 0.0)
            for name, n in totals.items()
        }
        languages[lang] = stats
    return FertilityReport(tokenizers=names, languages=languages, cells=cells)
