"""Long-context evaluation on a tiny model: position buckets add up to the plain bits-per-byte score of
the same text, passkey prompts have the asked length and depth, a short checkpoint is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vinasmol_core.builtin.sample_corpus import sample_texts
from vinasmol_core.builtin.tiny import build_tiny_base_model, build_tiny_tokenizer
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model.bpb import Scorer, score_documents
from vinasmol_core.model.long_context import (
    long_context_report,
    long_documents,
    passkey_prompt,
    position_bpb,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("long")
    tok = build_tiny_tokenizer(root / "tok", vocab_size=512)
    model = build_tiny_base_model(root / "model", tok, block_size=256)
    val = root / "en.jsonl"
    docs = [" ".join(sample_texts("en", 60, seed=3)[i : i + 4]) for i in range(0, 60, 4)]
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return model, val


def test_buckets_add_up_to_the_documents_score(tiny: tuple[Path, Path]) -> None:
    model, val = tiny
    scorer = Scorer(model)
    docs = long_documents([val], scorer, 128, max_docs=3)
    assert len(docs) == 3 and all(len(enc.ids) >= 128 for _, enc in docs)
    buckets = position_bpb(scorer, docs, 128)
    assert [b["bucket"] for b in buckets] == ["0-32", "32-64", "64-128"]
    assert [b["tokens"] for b in buckets] == [96, 96, 192]
    # the same tokens scored as plain documents: the text up to the 129th token's start
    cut = [text[: enc.offsets[128][0]] for text, enc in docs]
    assert [scorer.tokenizer.encode(c, add_special_tokens=False).ids for c in cut] == [
        enc.ids[:128] for _, enc in docs
    ]
    plain = score_documents(scorer, cut, seq_len=128)
    assert sum(b["bits"] for b in buckets) == pytest.approx(plain.bits, rel=1e-5)
    assert sum(b["bytes"] for b in buckets) == plain.bytes
    assert all(math.isfinite(b["bpb"]) and b["bpb"] > 0 for b in buckets)


def test_passkey_prompt_has_the_length_and_depth(tiny: tuple[Path, Path]) -> None:
    scorer = Scorer(tiny[0])
    needles = []
    for depth in (0.0, 0.5, 1.0):
        p = passkey_prompt(scorer, 200, depth, "48213")
        assert len(p.ids) == 200
        assert scorer.tokenizer.decode(p.ids[p.answer_start :]).strip() == "48213"
        text = scorer.tokenizer.decode(p.ids)
        assert text.count("48213") == 3  # twice in the needle, once as the answer
        needles.append(text.index("The pass key is"))
    assert needles[0] < needles[1] < needles[2]


def test_report_and_short_checkpoint_error(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, val = tiny
    report = long_context_report(model, {"en": [val]}, length=128, passkey_lengths=[192, 256],
                                 depths=[0.0, 1.0], trials=2, max_docs=2)
    assert report["block_size"] == 256 and report["bpb"]["en"]["docs"] == 2
    assert set(report["passkey"]) == {"192", "256"}
    for row in report["passkey"].values():
        assert set(row) == {"0", "1"}
        assert all(0 <= cell["exact"] <= cell["digits"] <= 1 and cell["trials"] == 2 for cell in row.values())
    with pytest.raises(VinaSmolError, match="block size is 256 tokens, shorter than the 512 tokens"):
        long_context_report(model, {"en": [val]}, length=128, passkey_lengths=[512])
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "A short document."}) + "\n", encoding="utf-8")
    with pytest.raises(VinaSmolError, match="no en validation document has 128 tokens"):
        long_context_report(model, {"en": [short]}, length=128, passkey_lengths=[])
