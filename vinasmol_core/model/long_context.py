"""Long-context evaluation: did context extension work?

* Bits per byte by position bucket: each long validation document (at least `length` tokens) is
  scored as one window of `length` tokens, and the negative log-likelihood of each token is
  summed into the bucket of its position. Buckets are the quarters and halves of the length
  (0-2k, 2k-4k, 4k-8k at 8192). A model that uses its long context has a later bucket at or below
  the first one; a model that lost it has the later buckets above.
* Passkey retrieval (Mohtashami and Jaggi 2023, "Landmark Attention"): a five-digit key hidden at a
  given depth of repeated filler text, the prompt asking for it at the end, `length` tokens in all.
  The answer is read by greedy decoding, computed in one forward pass: greedy decoding yields the
  key exactly when each key token is the argmax given the prompt and the key tokens before it.
  `exact` is the share of prompts whose key would be decoded whole, `digits` the share of key
  tokens that are the argmax.
"""

from __future__ import annotations

import math
import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model.bpb import Scorer, iter_texts

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def bucket_edges(length: int) -> list[int]:
    """Token positions bounding the buckets: 0, length/4, length/2, length."""
    return [0, length // 4, length // 2, length]


def bucket_label(lo: int, hi: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 and n else str(n)

    return f"{short(lo)}-{short(hi)}"


def check_length(scorer: Scorer, length: int, what: str) -> None:
    """A clear error when the checkpoint's block size is shorter than the requested length."""
    if length > scorer.max_len:
        raise VinaSmolError(
            f"{scorer.model_dir}: the checkpoint's block size is {scorer.max_len} tokens, shorter than the "
            f"{length} tokens that {what} asks for (evaluate a checkpoint after context extension, or "
            f"ask for at most {scorer.max_len})"
        )


def _forward_nll(scorer: Scorer, rows: list[list[int]]) -> Any:
    """Per-token negative log-likelihood (nats) of equal-length rows, each scored after <|endoftext|>."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(rows, dtype=torch.long)
    inputs = torch.cat([torch.full((len(rows), 1), scorer.eot, dtype=torch.long), ids[:, :-1]], dim=1)
    with torch.inference_mode():
        logits = scorer.logits(inputs.to(scorer.device)).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids.to(scorer.device), reduction="none")
    return nll.cpu(), logits.argmax(-1).cpu()


def long_documents(files: list[Path], scorer: Scorer, length: int, max_docs: int) -> list[tuple[str, Any]]:
    """The first `max_docs` NFC documents of `files` with at least `length` tokens, with encodings."""
    out = []
    for path in files:
        for text in iter_texts(Path(path)):
            text = unicodedata.normalize("NFC", text)
            enc = scorer.tokenizer.encode(text, add_special_tokens=False)
            if len(enc.ids) >= length:
                out.append((text, enc))
                if len(out) >= max_docs:
                    return out
    return out


def position_bpb(
    scorer: Scorer, docs: list[tuple[str, Any]], length: int, batch_tokens: int = 8192
) -> list[dict[str, Any]]:
    """Per bucket: bits per byte, bits, bytes and tokens over the first `length` tokens of each doc."""
    edges = bucket_edges(length)
    bits = [0.0] * (len(edges) - 1)
    nbytes = [0] * (len(edges) - 1)
    per_batch = max(1, batch_tokens // length)
    for i in range(0, len(docs), per_batch):
        batch = docs[i : i + per_batch]
        nll, _ = _forward_nll(scorer, [enc.ids[:length] for _, enc in batch])
        for row, (text, enc) in enumerate(batch):
            starts = [enc.offsets[p][0] for p in edges[:-1]]
            end = enc.offsets[length][0] if len(enc.ids) > length else len(text)
            for b in range(len(edges) - 1):
                bits[b] += float(nll[row, edges[b] : edges[b + 1]].sum()) / math.log(2)
                hi = starts[b + 1] if b + 1 < len(starts) else end
                nbytes[b] += len(text[starts[b] : hi].encode("utf-8"))
    return [
        {"bucket": bucket_label(edges[b], edges[b + 1]), "start": edges[b], "end": edges[b + 1],
         "bpb": bits[b] / nbytes[b] if nbytes[b] else math.nan,
         "bits": bits[b], "bytes": nbytes[b], "tokens": (edges[b + 1] - edges[b]) * len(docs)}
        for b in range(len(edges) - 1)
    ]


@dataclass
class PasskeyPrompt:
    ids: list[int]
    answer_start: int
    key: str


def passkey_prompt(scorer: Scorer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """`length` tokens: intro, filler with the needle at `depth` (0 = start, 1 = end), question, key."""
    def enc(text: str) -> list[int]:
        return scorer.tokenizer.encode(text, add_special_tokens=False).ids

    intro, needle = enc(INTRO), enc(NEEDLE.format(key=key))
    question, answer = enc(QUESTION), enc(" " + key)
    sentences = [enc(s + ". ") for s in FILLER.split(". ") if s.strip()]
    n_filler = length - len(intro) - len(needle) - len(question) - len(answer)
    if n_filler < 2 * max(map(len, sentences)):
        raise VinaSmolError(f"passkey length {length} is too short for the prompt (at least "
                            f"{length - n_filler + 2 * max(map(len, sentences))} tokens)")
    hay: list[int] = []
    bounds = [0]  # sentence boundaries in the filler, where the needle may go
    while len(hay) < n_filler:
        hay += sentences[(len(bounds) - 1) % len(sentences)]
        bounds.append(min(len(hay), n_filler))
    hay = hay[:n_filler]
    at = bounds[round(depth * (len(bounds) - 2))]
    ids = intro + hay[:at] + needle + hay[at:] + question + answer
    return PasskeyPrompt(ids=ids, answer_start=len(ids) - len(answer), key=key)


def passkey_accuracy(
    scorer: Scorer, lengths: list[int], depths: Sequence[float], trials: int = 2, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """{length: {depth: {"exact", "digits", "trials"}}}: greedy retrieval of the key, per length and depth."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for length in lengths:
        check_length(scorer, length, "the passkey test")
        out[str(length)] = {}
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")
            prompts = [passkey_prompt(scorer, length, depth, str(rng.randint(10000, 99999)))
                       for _ in range(trials)]
            exact, digits, n_digits = 0, 0, 0
            for p in prompts:
                _, pred = _forward_nll(scorer, [p.ids])
                hit = [int(pred[0, i]) == p.ids[i] for i in range(p.answer_start, len(p.ids))]
                exact += all(hit)
                digits += sum(hit)
                n_digits += len(hit)
            out[str(length)][f"{depth:g}"] = {"exact": exact / trials, "digits": digits / n_digits,
                                              "trials": trials}
    return out


def long_context_report(
    model_dir: Path,
    files: dict[str, list[Path]],
    *,
    length: int,
    passkey_lengths: list[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 2,
    max_docs: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Position-bucket BPB per language and passkey accuracy of one HF or litgpt folder.

    Raises VinaSmolError when the checkpoint is shorter than a requested length or a language has no
    validation document of `length` tokens."""
    if not files and not passkey_lengths:
        raise VinaSmolError("nothing to evaluate: give validation files or passkey lengths")
    scorer = Scorer(Path(model_dir), device=device, dtype=dtype)
    for n in [length, *passkey_lengths] if files else passkey_lengths:
        check_length(scorer, n, "the long-context evaluation")
    bpb: dict[str, Any] = {}
    for lang, paths in files.items():
        docs = long_documents([Path(p) for p in paths], scorer, length, max_docs)
        if not docs:
            raise VinaSmolError(f"no {lang} validation document has {length} tokens or more "
                                "(lower the length, or give longer documents)")
        bpb[lang] = {"docs": len(docs), "buckets": position_bpb(scorer, docs, length)}
    passkey = passkey_accuracy(scorer, passkey_lengths, depths, trials) if passkey_lengths else {}
    return {"length": length, "block_size": scorer.max_len, "bpb": bpb, "passkey": passkey}
