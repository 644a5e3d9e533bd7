"""The trainer's side of the data: samplers by global sequence index, tokenizer checks, byte counts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.tokenizer.text import bytes_to_unicode

LANGUAGES = ("vi", "en", "code")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "extension.json",
)


class Sampler(Protocol):
    def sequence(self, i: int) -> np.ndarray: ...


def open_sampler(
    dataset_dir: Path,
    weights: dict[str, float],
    seq_len: int,
    *,
    seed: int,
    stage: str,
    split: str = "train",
    long_context: dict[str, Any] | None = None,
) -> Sampler:
    """The data helper's MixtureSampler: `sequence(i)` is seq_len + 1 tokens, a pure function of i."""
    from vinasmol_core import data as data_mod

    lc: Any = None
    if long_context is not None:
        spec_cls = getattr(data_mod, "LongContextSpec", None)
        lc = spec_cls.model_validate(long_context) if spec_cls is not None else long_context
    try:
        return data_mod.MixtureSampler(
            Path(dataset_dir), dict(weights), seq_len, seed=seed, stage=stage, split=split, long_context=lc
        )
    except VinaSmolError:
        raise
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"cannot sample {split} data with weights {weights}: {exc}") from None


def load_validation(dataset_dir: Path, lang: str, seq_len: int, count: int) -> np.ndarray:
    """Up to `count` consecutive validation windows (seq_len + 1 tokens) of one language, stacked."""
    from vinasmol_core.data import validation_sequences

    try:
        seqs = [
            np.asarray(s, dtype=np.int64) for s in validation_sequences(dataset_dir, lang, seq_len, count)
        ]
    except (ConfigError, KeyError, ValueError):
        seqs = []
    if not seqs:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    return np.stack(seqs)


def batch_indices(
    step: int, micro: int, *, global_batch: int, micro_batch: int, rank: int, world: int
) -> list[int]:
    """Global sequence indices of micro-batch `micro` of optimizer step `step` on `rank`.

    Step s owns indices [s*G, (s+1)*G); rank r takes those with i % world == r, in order.
    """
    base = step * global_batch + rank
    first = micro * micro_batch
    return [base + world * (first + j) for j in range(micro_batch)]


def tokenizer_digest(tokenizer_dir: Path) -> str:
    """sha256 of tokenizer.json (the same definition as the data module's)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise VinaSmolError(f"{tokenizer_dir} has no tokenizer.json")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(
        with_added_tokens=True
    )


def check_data_matches_checkpoint(
    dataset_dir: Path, ckpt_dir: Path, dataset_tokenizer_digest: str, model_vocab_size: int
) -> None:
    """Refuse a dataset tokenized with another tokenizer than the checkpoint's, or a checkpoint whose
    embedding does not cover its own tokenizer."""
    ckpt_digest = tokenizer_digest(ckpt_dir)
    if dataset_tokenizer_digest and dataset_tokenizer_digest != ckpt_digest:
        raise ConfigError(
            f"the dataset was tokenized with tokenizer {dataset_tokenizer_digest[:12]} but the initial "
            f"checkpoint carries tokenizer {ckpt_digest[:12]} (vocabularies differ)"
        )
    try:
        from vinasmol_core.data import check_tokenizer
    except ImportError:
        check_tokenizer = None
    if check_tokenizer is not None:
        check_tokenizer(Path(dataset_dir), Path(ckpt_dir))
    vocab = tokenizer_vocab_size(ckpt_dir)
    if vocab != model_vocab_size:
        raise ConfigError(
            f"the initial checkpoint's tokenizer has {vocab} tokens but its model config says "
            f"vocab_size={model_vocab_size} (vocabularies differ)"
        )


def token_byte_lengths(tokenizer_dir: Path, size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits-per-byte."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    lengths = np.zeros(size, dtype=np.int64)
    byte_chars = set(bytes_to_unicode().values())
    vocab = data.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        for token, idx in vocab.items():
            if idx < size:
                lengths[idx] = (
                    len(token) if all(c in byte_chars for c in token) else len(token.encode("utf-8"))
                )
    for added in data.get("added_tokens", []):
        idx = added["id"]
        if idx < size:
            lengths[idx] = 0 if added.get("special", False) else len(added["content"].encode("utf-8"))
    return lengths


def eval_languages(
    mixture: dict[str, float], explicit: list[str] | None, available: set[str] | None
) -> list[str]:
    """Languages to validate on: explicit list, else the mixture's language keys (else all known)."""
    if explicit is not None:
        langs = list(explicit)
    else:
        langs = [k for k in LANGUAGES if k in mixture] or list(LANGUAGES)
    if available:
        langs = [lang for lang in langs if lang in available]
    return langs
