"""Small corpora, tokenizers and prepared datasets shared by the data tests (built once per session)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from vinasmol_core.builtin.sample_corpus import sample_texts, write_sample_corpora
from vinasmol_core.data import PrepareSettings, SourceSpec, prepare_dataset


def _cached_dir(factory: pytest.TempPathFactory, name: str) -> tuple[Path, bool]:
    path = factory.getbasetemp() / "data-fixtures" / name
    return path, path.exists()


def tiny_tokenizer(factory: pytest.TempPathFactory, vocab_size: int = 1024) -> Path:
    """SmolLM2-shaped byte-level BPE (digits split, <|endoftext|> = 0) trained on English and code."""
    from vinasmol_core.builtin.tiny import build_tiny_tokenizer

    path, ready = _cached_dir(factory, f"tokenizer-{vocab_size}")
    if not ready:
        build_tiny_tokenizer(path, vocab_size=vocab_size)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def sample_corpora(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vi/en (60 synthetic documents each) and code (20 small stdlib modules) JSONL files."""
    path, ready = _cached_dir(factory, "corpora")
    if not ready:
        files = write_sample_corpora(path / "raw", docs_per_lang=60, seed=0)
        code = [{"id": f"code-{i}", "text": t} for i, t in enumerate(sample_texts("code", 20))]
        files["code"] = write_jsonl(path / "code.jsonl", code)
        for lang, f in files.items():
            (path / f"{lang}.jsonl").write_bytes(Path(f).read_bytes())
    return {lang: path / f"{lang}.jsonl" for lang in ("vi", "en", "code")}


def long_short_corpus(factory: pytest.TempPathFactory) -> Path:
    """English documents: 40 short ones (a paragraph) and 8 long ones (about 40 paragraphs)."""
    path, ready = _cached_dir(factory, "long-short")
    if not ready:
        rng = random.Random(7)
        paras = sample_texts("en", 400, seed=3)
        records = []
        for i in range(48):
            n = 40 if i % 6 == 0 else 1
            records.append({"id": f"d{i}", "text": "\n".join(rng.choice(paras) for _ in range(n))})
        write_jsonl(path / "en.jsonl", records)
    return path / "en.jsonl"


def mixture_dataset(factory: pytest.TempPathFactory) -> Path:
    """A dataset with sources sample-vi, sample-en, sample-code (main) and vi-best (annealing)."""
    out, ready = _cached_dir(factory, "mixture-dataset")
    if ready:
        return out
    files = sample_corpora(factory)
    anneal = write_jsonl(out.parent / "anneal.jsonl",
                         [{"id": f"a{i}", "text": t} for i, t in enumerate(sample_texts("vi", 30, seed=11))])
    sources = [SourceSpec(name=f"sample-{lang}", lang=lang, paths=(str(p),)) for lang, p in files.items()]
    sources.append(SourceSpec(name="vi-best", lang="vi", role="annealing", paths=(str(anneal),)))
    prepare_dataset(sources, tiny_tokenizer(factory), out, PrepareSettings(val_fraction=0.1, workers=0))
    return out
