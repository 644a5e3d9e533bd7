"""Bits per byte: a language-modelling score that does not depend on the tokenizer.

BPB = (sum over documents of the tokens' negative log-likelihood, in bits) / (UTF-8 bytes of the
documents). Text is NFC-normalised first (the tokenizers do so), each document is tokenised on its
own and scored in windows of at most `seq_len` tokens, each window's context starting with
`<|endoftext|>`. Two models with different vocabularies are therefore compared on the same bytes.
"""

from __future__ import annotations

import gzip
import json
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model import hf_io
from vinasmol_core.model.litgpt_io import LIT_CONFIG, LIT_WEIGHTS


def iter_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a .jsonl(.gz) file (field `text_field`) or of a .txt(.gz) file (the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise VinaSmolError(f"evaluation file {path} does not exist")
    name = path.name
    opener = gzip.open if name.endswith(".gz") else open
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith((".jsonl", ".json")):
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise VinaSmolError(f"{path}:{lineno}: no {text_field!r} string field") from exc
                yield text
    else:
        with opener(path, "rt", encoding="utf-8") as f:
            yield f.read()


def _cut(data: bytes, limit: int) -> tuple[str, bytes]:
    """The longest prefix of UTF-8 `data` within `limit` bytes that ends on a character boundary."""
    text = data[:limit].decode("utf-8", errors="ignore")
    return text, text.encode("utf-8")


def select_documents(
    files: list[Path],
    max_docs: int | None = None,
    max_bytes: int | None = None,
    max_doc_bytes: int | None = None,
) -> list[str]:
    """NFC documents in file order: at most `max_docs` of them, each cut to its first `max_doc_bytes`
    UTF-8 bytes, at most `max_bytes` in all (the last one cut at a character boundary). The same caps
    give the same text for every model."""
    docs: list[str] = []
    total = 0
    for path in files:
        for text in iter_texts(path):
            if max_docs is not None and len(docs) >= max_docs:
                return docs
            if max_bytes is not None and total >= max_bytes:
                return docs
            text = unicodedata.normalize("NFC", text)
            data = text.encode("utf-8")
            if max_doc_bytes is not None and len(data) > max_doc_bytes:
                text, data = _cut(data, max_doc_bytes)
            if max_bytes is not None and total + len(data) > max_bytes:
                text, data = _cut(data, max_bytes - total)
            if data:
                docs.append(text)
                total += len(data)
    return docs


@dataclass
class LangScore:
    """Totals for one language."""

    bpb: float
    bits: float
    bytes: int
    tokens: int
    docs: int
    bytes_per_token: float = field(default=0.0)


class Scorer:
    """Next-token logits of an HF or litgpt model folder, cut to the tokenizer's vocabulary."""

    def __init__(
        self, model_dir: Path, device: str = "cpu", dtype: str = "float32", model: Any = None
    ) -> None:
        import torch

        from vinasmol_core.model.embeddings import load_tokenizer

        self.model_dir = Path(model_dir)
        self.device = device
        self.tokenizer = load_tokenizer(self.model_dir)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        eot = self.tokenizer.token_to_id("<|endoftext|>")
        if eot is None:
            raise VinaSmolError(f"{self.model_dir}: the tokenizer has no <|endoftext|> token")
        self.eot = eot
        torch_dtype = getattr(torch, dtype)
        if model is not None:
            self.kind, self.model = "hf", model.to(device=device, dtype=torch_dtype).eval()
            self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))
        elif (self.model_dir / LIT_CONFIG).is_file() and (self.model_dir / LIT_WEIGHTS).is_file():
            from vinasmol_core.model.litgpt_io import (
                build_litgpt_model,
                load_litgpt_config,
                load_litgpt_weights,
            )

            config = load_litgpt_config(self.model_dir)
            state, _ = load_litgpt_weights(self.model_dir / LIT_WEIGHTS)
            self.kind = "litgpt"
            self.model = build_litgpt_model(config, state, dtype=torch_dtype).to(device)
            self.max_len = config.block_size
        elif (self.model_dir / "config.json").is_file():
            from vinasmol_core.model.parity import load_hf_model

            hf_io.check_hf_dir(self.model_dir)
            self.kind = "hf"
            self.model = load_hf_model(self.model_dir, torch_dtype).to(device)
            self.max_len = int(self.model.config.max_position_embeddings)
        else:
            raise VinaSmolError(
                f"{self.model_dir} is neither an HF folder (config.json) nor a litgpt folder "
                f"({LIT_CONFIG} + {LIT_WEIGHTS})"
            )

    def logits(self, ids: Any) -> Any:
        out = self.model(ids)
        logits = out if self.kind == "litgpt" else out.logits
        return logits[..., : self.vocab_size]


def _windows(ids: list[int], seq_len: int, eot: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs covering every token once; each window's context starts with eot."""
    for start in range(0, len(ids), seq_len):
        chunk = ids[start : start + seq_len]
        yield [eot] + chunk[:-1], chunk


def score_documents(
    scorer: Scorer, docs: list[str], seq_len: int = 1024, batch_tokens: int = 4096
) -> LangScore:
    """Total NLL in bits of `docs` under the scorer's model, with bytes and token counts."""
    import torch
    import torch.nn.functional as F

    seq_len = min(seq_len, scorer.max_len)
    encodings = scorer.tokenizer.encode_batch(docs, add_special_tokens=False)
    windows = [w for enc in encodings for w in _windows(enc.ids, seq_len, scorer.eot)]
    windows.sort(key=lambda w: -len(w[0]))
    nats = 0.0
    i = 0
    while i < len(windows):
        width = len(windows[i][0])
        batch = windows[i : i + max(1, batch_tokens // width)]
        i += len(batch)
        inputs = torch.full((len(batch), width), scorer.eot, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (inp, tgt) in enumerate(batch):
            inputs[row, : len(inp)] = torch.tensor(inp)
            targets[row, : len(tgt)] = torch.tensor(tgt)
        with torch.inference_mode():
            logits = scorer.logits(inputs.to(scorer.device)).float()
            nats += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.to(scorer.device).reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(e.ids) for e in encodings)
    bits = nats / math.log(2)
    return LangScore(
        bpb=bits / n_bytes if n_bytes else float("nan"),
        bits=bits,
        bytes=n_bytes,
        tokens=n_tokens,
        docs=len(docs),
        bytes_per_token=n_bytes / n_tokens if n_tokens else 0.0,
    )


def bits_per_byte_report(
    model_dir: Path,
    files: dict[str, list[Path]],
    max_docs: int | None = None,
    seq_len: int = 1024,
    *,
    max_bytes: int | None = None,
    max_doc_bytes: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_tokens: int = 4096,
    model: Any = None,
) -> dict[str, LangScore]:
    """Per-language scores with totals. `model` (an HF model object) overrides loading from model_dir
    (the tokenizer still comes from model_dir)."""
    if not files:
        raise VinaSmolError("no evaluation data: give at least one LANG=FILE")
    scorer = Scorer(Path(model_dir), device=device, dtype=dtype, model=model)
    report = {}
    for lang, paths in files.items():
        docs = select_documents(
            [Path(p) for p in paths], max_docs=max_docs, max_bytes=max_bytes, max_doc_bytes=max_doc_bytes
        )
        if not docs:
            raise VinaSmolError(f"evaluation data for {lang!r} holds no text")
        report[lang] = score_documents(scorer, docs, seq_len=seq_len, batch_tokens=batch_tokens)
    return report


def bits_per_byte(
    model_dir: Path,
    files: dict[str, list[Path]],
    max_docs: int | None = None,
    seq_len: int = 1024,
    **kwargs: Any,
) -> dict[str, float]:
    """Bits per byte per language of an HF or litgpt model folder."""
    report = bits_per_byte_report(model_dir, files, max_docs=max_docs, seq_len=seq_len, **kwargs)
    return {lang: score.bpb for lang, score in report.items()}


def report_to_json(report: dict[str, LangScore]) -> dict[str, Any]:
    return {lang: asdict(score) for lang, score in report.items()}
