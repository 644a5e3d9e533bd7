"""Small fixtures for the tokenizer tests, built once per test session: a tiny GPT-2-style base
tokenizer, the sample corpora, and the base extended on the Vietnamese sample."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="vinasmol-tokenizer-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)

# The sample Vietnamese corpus supports a few hundred merges seen at least twice: 1088 is exact.
EXACT_TARGET = 1088


@functools.cache
def tiny_base() -> Path:
    from vinasmol_core.builtin.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(_ROOT / "tiny-base", vocab_size=1024)


@functools.cache
def sample_data() -> dict[str, Path]:
    from vinasmol_core.builtin.sample_corpus import write_sample_corpora

    return write_sample_corpora(_ROOT / "data", docs_per_lang=200)


@functools.cache
def vi_counts():  # noqa: ANN201
    from vinasmol_core.tokenizer import count_words

    return count_words([sample_data()["vi"]], pre_tokenizer=tiny_base())


@functools.cache
def extended() -> Path:
    """The tiny base extended to EXACT_TARGET tokens on the Vietnamese sample."""
    from vinasmol_core.tokenizer import extend_tokenizer

    out = _ROOT / "extended"
    extend_tokenizer(tiny_base(), vi_counts(), EXACT_TARGET, out)
    return out


def read_docs(path: Path, limit: int | None = None, max_chars: int | None = None) -> list[str]:
    """Texts of a JSONL sample file (the first `limit`, each cut to `max_chars`)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines if line.strip()][:limit]
    return [d[:max_chars] for d in docs] if max_chars else docs


def scratch(name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT))
    return path
