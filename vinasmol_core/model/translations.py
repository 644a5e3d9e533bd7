"""Where translations of new tokens come from, for the `translation-blend` initialisation.

A source maps words of the new language to words of the base language. Two are provided: a TSV
dictionary (`word<TAB>translation` per line) and a Hugging Face seq2seq model (for example
VietAI/envit5-translation, from a local folder or a hub id when the hub is reachable).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from vinasmol_core.common.errors import VinaSmolError


@runtime_checkable
class TranslationSource(Protocol):
    """Translate words; None where the source has no translation."""

    def translate(self, words: Sequence[str]) -> list[str | None]: ...


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class TsvTranslations:
    """A dictionary file: one `word<TAB>translation` per line; `#` starts a comment line.

    Lookup is NFC-normalised, exact first, then lower-cased."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise VinaSmolError(f"translation dictionary {path} does not exist")
        self.path = path
        self.table: dict[str, str] = {}
        self.lower: dict[str, str] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
                raise VinaSmolError(f"{path}:{lineno}: expected 'word<TAB>translation', got {line!r}")
            src, dst = _nfc(parts[0].strip()), _nfc(parts[1].strip())
            self.table.setdefault(src, dst)
            self.lower.setdefault(src.lower(), dst)

    def __len__(self) -> int:
        return len(self.table)

    def translate(self, words: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        for word in words:
            w = _nfc(word.strip())
            out.append(self.table.get(w) or self.lower.get(w.lower()))
        return out


class Seq2SeqTranslations:
    """Translate with a Hugging Face encoder-decoder model (loaded lazily on first use).

    `source_prefix` is prepended to each input and `strip_prefix` removed from each output, as
    envit5-translation expects ("vi: ..." in, "en: ..." out)."""

    def __init__(
        self,
        model: str | Path,
        *,
        source_prefix: str = "vi: ",
        strip_prefix: str = "en: ",
        batch_size: int = 64,
        max_new_tokens: int = 16,
        device: str = "cpu",
        local_files_only: bool | None = None,
    ) -> None:
        self.model_id = str(model)
        self.source_prefix = source_prefix
        self.strip_prefix = strip_prefix
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.local_files_only = Path(model).is_dir() if local_files_only is None else local_files_only
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model_id, local_files_only=self.local_files_only
            )
            model = AutoModelForSeq2SeqLM.from_pretrained(
                self.model_id, local_files_only=self.local_files_only
            )
        except OSError as exc:
            raise VinaSmolError(f"cannot load translation model {self.model_id!r}: {exc}") from exc
        self._model = model.to(self.device).eval()

    def translate(self, words: Sequence[str]) -> list[str | None]:
        import torch

        self._load()
        assert self._model is not None and self._tokenizer is not None
        out: list[str | None] = []
        for start in range(0, len(words), self.batch_size):
            batch = [self.source_prefix + _nfc(w.strip()) for w in words[start : start + self.batch_size]]
            enc = self._tokenizer(batch, return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                gen = self._model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False
                )
            for text in self._tokenizer.batch_decode(gen, skip_special_tokens=True):
                text = text.strip()
                if self.strip_prefix and text.startswith(self.strip_prefix.strip()):
                    text = text[len(self.strip_prefix.strip()) :].strip()
                out.append(text or None)
        return out


def translation_source(spec: str | Path | None) -> TranslationSource | None:
    """A TSV file path gives TsvTranslations; anything else (a folder or a hub id) a seq2seq model."""
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        return TsvTranslations(path)
    return Seq2SeqTranslations(spec)
