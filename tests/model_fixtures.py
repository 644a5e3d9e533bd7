"""Fixtures for the model tests: the tiny base and an extended tokenizer made by appending BPE merges."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vinasmol_core.builtin.sample_corpus import sample_texts
from vinasmol_core.builtin.tiny import build_tiny_base_model, build_tiny_tokenizer


def extend_tokenizer_with_merges(base_dir: Path, out_dir: Path, n_new: int, texts: list[str]) -> Path:
    """Append `n_new` BPE merges learned on `texts` (greedy pair counts over pre-tokenized words).

    Every new token is a merge of two existing tokens, so ids 0..V-1 are unchanged and the result is a
    proper extension of the base tokenizer."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    data = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for piece, _ in base.pre_tokenizer.pre_tokenize_str(text):
            words[tuple(t.value for t in base.model.tokenize(piece))] += 1
    next_id = max(vocab.values()) + 1
    for _ in range(n_new):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:], strict=False):
                if a + b not in vocab:
                    pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        vocab[a + b] = next_id
        next_id += 1
        merges.append([a, b])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).write_text((base_dir / name).read_text(encoding="utf-8"), encoding="utf-8")
    return out_dir


def build_tiny_setup(root: Path, n_new: int = 120, **model_kwargs) -> dict[str, Path]:
    """Tiny base tokenizer, tiny base model, and an extended tokenizer with Vietnamese merges."""
    tok = build_tiny_tokenizer(root / "tok", vocab_size=512)
    base = build_tiny_base_model(root / "base", tok, **model_kwargs)
    ext = extend_tokenizer_with_merges(tok, root / "ext-tok", n_new, sample_texts("vi", 150))
    return {"tok": tok, "base": base, "ext_tok": ext}


_CACHE: dict[str, dict[str, Path]] = {}


def shared_tiny(tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001 - pytest's TempPathFactory
    """Built once per session: tiny base, extended tokenizer, extended model, its litgpt conversion."""
    if "tiny" not in _CACHE:
        from vinasmol_core.model import extend_model, hf_to_litgpt

        root = tmp_path_factory.mktemp("model-tiny")
        setup = build_tiny_setup(root)
        setup["ext"] = extend_model(setup["base"], setup["ext_tok"], root / "ext")
        setup["lit"] = hf_to_litgpt(setup["ext"], root / "lit")
        _CACHE["tiny"] = setup
    return _CACHE["tiny"]


def tiny_stage_inputs(tmp_path_factory, name: str) -> Iterator[Any]:  # noqa: ANN001 - pytest's TempPathFactory
    """The body of a module-scoped `env` fixture for stage tests: the tiny model, tokenizer and dataset
    in a file:// store (`build_tiny_inputs`), with the cache, TMPDIR (where killed stage processes
    leave their work folders) and TorchDynamo off for the module's life."""
    import pytest

    from vinasmol_core.builtin.fixtures import build_tiny_inputs

    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VINASMOL_CACHE", str(root / "cache"))
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        (root / "tmp").mkdir()
        mp.setenv("TMPDIR", str(root / "tmp"))
        yield build_tiny_inputs(root / "inputs", (root / "store").as_uri(), block_size=64)
