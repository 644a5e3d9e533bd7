"""Resize a model's (tied) embeddings to an extended tokenizer and initialise the new rows.

The extended tokenizer must keep every id of the base tokenizer (ids 0..V-1 name the same tokens)
and append new ones. Old rows are copied bit for bit; each new row is built from base rows:

- `subword-mean`: the mean of the base rows of the token's segmentation under the base tokenizer.
  For a byte-level BPE token this is the base BPE applied to the token's own byte string, so a
  token that is not valid UTF-8 on its own (a partial character) is still segmented exactly.
- `translation-blend`: `(1 - blend) * subword_mean + blend * mean(base rows of the translation)`,
  for tokens whose text has a translation; the others keep their subword mean.
- `distill`: the subword means, then only the new rows fitted by self-distillation on training
  text, the base model as its own teacher (`vinasmol_core.model.distill`): the extended model
  should do with a new token what the base model does with its pieces.

Means are computed for all new rows at once (a flat index list, an owner index and `index_add_`)
in float64, then cast to the weights' dtype.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.model import hf_io
from vinasmol_core.model.distill import DistillSettings
from vinasmol_core.model.translations import TranslationSource, translation_source
from vinasmol_core.tokenizer.text import unicode_to_bytes

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

INIT_METHODS = ("subword-mean", "translation-blend", "distill")
EXTENSION_FILE = "extension.json"


def token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token stands for; None when it is not in the byte alphabet."""
    table = unicode_to_bytes()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:
        return None


def load_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise VinaSmolError(f"{tokenizer_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(path))


def id_to_token_list(tok: Tokenizer, name: str) -> list[str]:
    """Every token of a tokenizer by id; its ids must be 0..n-1 without gaps."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * len(vocab)
    for token, idx in vocab.items():
        if idx >= len(vocab) or tokens[idx] is not None:
            raise VinaSmolError(f"{name}: token ids are not contiguous (id {idx} for {token!r})")
        tokens[idx] = token
    return tokens  # type: ignore[return-value]


def check_extension(base_tokens: list[str], new_tokens: list[str], model_rows: int) -> None:
    """Raise VinaSmolError unless the new vocabulary extends the base one and covers the model's rows."""
    base_size, new_size = len(base_tokens), len(new_tokens)
    if model_rows < base_size:
        raise VinaSmolError(
            f"the model has {model_rows} embedding rows but its tokenizer has {base_size} tokens"
        )
    if new_size < model_rows:
        raise VinaSmolError(
            f"the new tokenizer's vocabulary ({new_size}) is smaller than the model's ({model_rows} rows); "
            "an extended tokenizer must keep every base id and add tokens after them"
        )
    differ = [i for i in range(base_size) if base_tokens[i] != new_tokens[i]]
    if differ:
        i = differ[0]
        raise VinaSmolError(
            f"the tokenizer is not an extension of the model's base tokenizer: {len(differ)} of the base ids "
            f"0..{base_size - 1} name other tokens (first: id {i} is {base_tokens[i]!r} in the base, "
            f"{new_tokens[i]!r} in the new tokenizer)"
        )


def token_text(new_tok: Tokenizer, token_id: int) -> str | None:
    """The text a token stands for (None for byte sequences that are not valid UTF-8)."""
    token = new_tok.id_to_token(token_id)
    raw = token_bytes(token) if token is not None else None
    if raw is None:
        return token
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def segment_tokens(base_tok: Tokenizer, new_tok: Tokenizer, ids: Sequence[int]) -> list[list[int]]:
    """Base-tokenizer segmentation of each new token.

    Byte-level tokens of the BPE model are segmented by running the base BPE model on the token's own
    byte string (no pre-tokenizer, no normalizer: the token is one pre-token). Added tokens, and tokens
    of a tokenizer that is not byte-level, are segmented by encoding their text with the base tokenizer."""
    added = new_tok.get_added_tokens_decoder()
    base_model = base_tok.model
    segments: list[list[int]] = []
    for token_id in ids:
        token = new_tok.id_to_token(token_id)
        if token is None:
            raise VinaSmolError(f"the new tokenizer has no token with id {token_id}")
        pieces: list[int] = []
        if token_id not in added and token_bytes(token) is not None:
            parts = base_model.tokenize(token)
            if "".join(p.value for p in parts) == token:
                pieces = [p.id for p in parts]
        if not pieces:
            text = added[token_id].content if token_id in added else new_tok.decode([token_id])
            pieces = base_tok.encode(text, add_special_tokens=False).ids
        segments.append(pieces)
    return segments


def mean_rows(weight: torch.Tensor, segments: Sequence[Sequence[int]]) -> torch.Tensor:
    """Row i of the result is the float64 mean of weight[segments[i]] (the mean of all rows if empty)."""
    import torch

    n, dim = len(segments), weight.shape[1]
    lengths = torch.tensor([len(s) for s in segments], dtype=torch.long)
    flat = torch.tensor([i for s in segments for i in s], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(n), lengths)
    out = torch.zeros(n, dim, dtype=torch.float64)
    if flat.numel():
        out.index_add_(0, owner, weight.index_select(0, flat).to(torch.float64))
    out /= lengths.clamp(min=1).to(torch.float64).unsqueeze(1)
    empty = lengths == 0
    if bool(empty.any()):
        out[empty] = weight.to(torch.float64).mean(0)
    return out


@dataclass
class InitResult:
    """New rows (float64) and what was done to build them."""

    rows: dict[str, Any]
    segments: list[list[int]]
    translated: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def init_new_rows(
    weights: dict[str, torch.Tensor],
    base_tok: Tokenizer,
    new_tok: Tokenizer,
    new_ids: Sequence[int],
    *,
    init: str = "subword-mean",
    translator: TranslationSource | None = None,
    blend: float = 0.5,
) -> InitResult:
    """Initial values of the new rows of each matrix in `weights` (e.g. the tied embedding)."""
    if init not in INIT_METHODS:
        raise ConfigError(f"init: unknown method {init!r}; choose one of {', '.join(INIT_METHODS)}")
    if not 0.0 <= blend <= 1.0:
        raise ConfigError(f"blend: must be within [0, 1], got {blend}")
    segments = segment_tokens(base_tok, new_tok, new_ids)
    rows = {name: mean_rows(w, segments) for name, w in weights.items()}
    translated = 0
    if init == "translation-blend":
        if translator is None:
            raise ConfigError(
                "translations: translation-blend needs a translation source (a TSV dictionary "
                "or a seq2seq model)"
            )
        texts = [token_text(new_tok, i) for i in new_ids]
        wanted = [k for k, t in enumerate(texts) if t is not None and any(ch.isalpha() for ch in t)]
        words = [texts[k].strip() for k in wanted]  # type: ignore[union-attr]
        found = translator.translate(words) if words else []
        rows_with, trans_segments = [], []
        for k, dst in zip(wanted, found, strict=True):
            if not dst:
                continue
            text = texts[k]
            assert text is not None
            lead = text[: len(text) - len(text.lstrip())]
            ids = base_tok.encode(lead + unicodedata.normalize("NFC", dst), add_special_tokens=False).ids
            if ids:
                rows_with.append(k)
                trans_segments.append(ids)
        translated = len(rows_with)
        if rows_with:
            import torch

            index = torch.tensor(rows_with, dtype=torch.long)
            for name, w in weights.items():
                trans = mean_rows(w, trans_segments)
                rows[name][index] = (1.0 - blend) * rows[name][index] + blend * trans
    return InitResult(rows=rows, segments=segments, translated=translated)


def extend_model(
    base_hf_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    init: str = "subword-mean",
    translations: Path | str | None = None,
    blend: float = 0.5,
    *,
    translator: TranslationSource | None = None,
    corpus: Sequence[tuple[Any, float]] | None = None,
    distill: DistillSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write an HF folder whose embeddings are resized to `tokenizer_dir`'s vocabulary.

    Rows of base ids are bit-identical to the base model's; rows of new ids are initialised by `init`;
    the model has exactly as many rows as the tokenizer has tokens. Tied embeddings stay one tensor
    (no lm_head in the file); an untied lm_head gets the same treatment. `distill` fits the new rows
    on `corpus` (pairs of a corpus as `iter_documents` reads it and its weight: training text, never
    validation text), with `distill` settings (default `DistillSettings()`); `log` gets its
    progress lines. Nothing is written on error."""
    import torch

    base_hf_dir, tokenizer_dir = Path(base_hf_dir), Path(tokenizer_dir)
    if init not in INIT_METHODS:
        raise ConfigError(f"init: unknown method {init!r}; choose one of {', '.join(INIT_METHODS)}")
    if init == "translation-blend" and translator is None:
        translator = translation_source(translations)
    if init == "distill" and not corpus:
        raise ConfigError("corpus: the distill init needs training text (at least one corpus)")
    config = hf_io.check_hf_dir(base_hf_dir)
    base_tok, new_tok, base_tokens, new_tokens = _load_tokenizers(base_hf_dir, tokenizer_dir)
    state, rows = _load_embedding(base_hf_dir, config)
    check_extension(base_tokens, new_tokens, rows)
    tied = hf_io.is_tied(config, state)
    base_size, new_size = len(base_tokens), len(new_tokens)

    matrices = {hf_io.EMBED_KEY: state[hf_io.EMBED_KEY]}
    if not tied:
        matrices[hf_io.LM_HEAD_KEY] = state[hf_io.LM_HEAD_KEY]
    result = init_new_rows(
        matrices, base_tok, new_tok, list(range(base_size, new_size)), init=init, translator=translator,
        blend=blend,
    )
    if init == "distill":
        assert corpus is not None
        result.details["distill"] = _distill(
            base_hf_dir, new_tok, base_size, result, corpus, distill or DistillSettings(), tied, log
        )
    for name, w in matrices.items():
        state[name] = torch.cat([w[:base_size], result.rows[name].to(w.dtype)], dim=0).contiguous()
    if tied:
        state.pop(hf_io.LM_HEAD_KEY, None)
    new_config = dict(config)
    new_config["vocab_size"] = new_size
    new_config["tie_word_embeddings"] = tied

    info = {
        "base_vocab_size": base_size,
        "vocab_size": new_size,
        "base_model_rows": rows,
        "new_token_ids": [base_size, new_size],
        "init": init,
        "blend": blend if init == "translation-blend" else None,
        "translated_tokens": result.translated,
        "distill": result.details.get("distill"),
        "tied": tied,
        "base_tokenizer_digest": hf_io.tokenizer_digest(base_hf_dir),
        "tokenizer_digest": hf_io.tokenizer_digest(tokenizer_dir),
    }
    _write_model(Path(out_dir), state, new_config, base_hf_dir, tokenizer_dir, info)
    return Path(out_dir)


def _distill(
    base_hf_dir: Path,
    new_tok: Tokenizer,
    base_size: int,
    result: InitResult,
    corpus: Sequence[tuple[Any, float]],
    settings: DistillSettings,
    tied: bool,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Replace the subword-mean rows of `result` by distilled ones; the run's details."""
    import torch

    from vinasmol_core.model.distill import distill_rows
    from vinasmol_core.model.parity import load_hf_model

    model = load_hf_model(base_hf_dir).to(settings.device)
    if model.get_input_embeddings().weight.shape[0] != base_size:
        raise VinaSmolError(
            f"distill: the base model has {model.get_input_embeddings().weight.shape[0]} embedding rows, "
            f"its tokenizer {base_size} tokens; pad rows are not supported"
        )
    out = distill_rows(
        model, new_tok, base_size, result.segments, result.rows[hf_io.EMBED_KEY], corpus, settings,
        init_out=None if tied else result.rows[hf_io.LM_HEAD_KEY], log=log,
    )
    result.rows[hf_io.EMBED_KEY] = out.new_in.to(torch.float64)
    if out.new_out is not None:
        result.rows[hf_io.LM_HEAD_KEY] = out.new_out.to(torch.float64)
    return out.details


def _load_tokenizers(
    base_hf_dir: Path, tokenizer_dir: Path
) -> tuple[Tokenizer, Tokenizer, list[str], list[str]]:
    """The base model's tokenizer and the extended one, and each one's tokens by id."""
    if not (base_hf_dir / "tokenizer.json").is_file():
        raise VinaSmolError(
            f"{base_hf_dir} has no tokenizer.json: the base tokenizer is needed to check "
            "the extension and to segment new tokens"
        )
    base_tok, new_tok = load_tokenizer(base_hf_dir), load_tokenizer(tokenizer_dir)
    base_tokens = id_to_token_list(base_tok, f"{base_hf_dir}/tokenizer.json")
    new_tokens = id_to_token_list(new_tok, f"{tokenizer_dir}/tokenizer.json")
    return base_tok, new_tok, base_tokens, new_tokens


def _load_embedding(base_hf_dir: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """The base model's weights and the number of rows of its embedding (checked against its config)."""
    state = hf_io.load_hf_state_dict(base_hf_dir)
    if hf_io.EMBED_KEY not in state:
        raise VinaSmolError(f"{base_hf_dir}: no {hf_io.EMBED_KEY} in the weights")
    rows = state[hf_io.EMBED_KEY].shape[0]
    if config.get("vocab_size", rows) != rows:
        raise VinaSmolError(
            f"{base_hf_dir}/config.json: vocab_size {config.get('vocab_size')} does not match "
            f"the {rows} rows of {hf_io.EMBED_KEY}"
        )
    return state, rows


def _write_model(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any], base_hf_dir: Path,
                 tokenizer_dir: Path, info: dict[str, Any]) -> None:
    """The HF folder: weights, config, the base's generation config, the new tokenizer and `info`."""
    from safetensors.torch import save_file

    with hf_io.atomic_output_dir(out_dir) as tmp:
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        hf_io.write_json(tmp / "config.json", config)
        if (base_hf_dir / "generation_config.json").is_file():
            hf_io.write_json(
                tmp / "generation_config.json", hf_io.read_json(base_hf_dir / "generation_config.json")
            )
        hf_io.copy_tokenizer_files(tokenizer_dir, tmp)
        hf_io.write_json(tmp / EXTENSION_FILE, info)
