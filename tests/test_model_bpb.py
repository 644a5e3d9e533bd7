"""Bits per byte, and the model commands end to end through the CLI."""

from __future__ import annotations

import gzip
import json
import math
import unicodedata

import pytest
import torch
from typer.testing import CliRunner

from tests.model_fixtures import shared_tiny
from vinasmol_core.builtin.sample_corpus import sample_texts
from vinasmol_core.cli import app
from vinasmol_core.model import bits_per_byte, bits_per_byte_report
from vinasmol_core.model.bpb import select_documents


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpb-data")
    files = {}
    for lang in ("vi", "en"):
        path = root / f"{lang}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for i, text in enumerate(sample_texts(lang, 12, seed=7)):
                # decomposed (NFD) input must score exactly like its NFC form
                text = unicodedata.normalize("NFD", text) if i % 2 else text
                f.write(json.dumps({"id": str(i), "text": text, "source": "t"}, ensure_ascii=False) + "\n")
        files[lang] = [path]
    return files


def _manual_bpb(model_dir, texts, seq_len):
    """Direct computation with transformers, one window at a time."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    nats, n_bytes = 0.0, 0
    for text in texts:
        text = unicodedata.normalize("NFC", text)
        n_bytes += len(text.encode("utf-8"))
        ids = tok.encode(text, add_special_tokens=False).ids
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            inp = torch.tensor([[0] + chunk[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(inp).logits[0].float(), -1)
            nats -= float(logp[torch.arange(len(chunk)), torch.tensor(chunk)].sum())
    return nats / math.log(2) / n_bytes


def test_bpb_matches_a_direct_computation(tiny, data):
    docs = select_documents(data["vi"], max_docs=3)
    expected = _manual_bpb(tiny["ext"], docs, seq_len=64)
    got = bits_per_byte(tiny["ext"], {"vi": data["vi"]}, max_docs=3, seq_len=64)
    assert got["vi"] == pytest.approx(expected, rel=1e-5)
    assert 0 < got["vi"] < 20


def test_hf_and_litgpt_folders_score_the_same(tiny, data):
    hf = bits_per_byte(tiny["ext"], data, max_docs=4, seq_len=128)
    lit = bits_per_byte(tiny["lit"], data, max_docs=4, seq_len=128)
    for lang in data:
        assert lit[lang] == pytest.approx(hf[lang], rel=1e-5)


def test_same_bytes_for_base_and_extended_models(tiny, data):
    base = bits_per_byte_report(tiny["base"], data, max_bytes=3000)
    ext = bits_per_byte_report(tiny["ext"], data, max_bytes=3000)
    for lang in data:
        assert base[lang].bytes == ext[lang].bytes <= 3000
        assert base[lang].docs == ext[lang].docs
    # the extended tokenizer needs fewer tokens for Vietnamese, the same for English
    assert ext["vi"].tokens < base["vi"].tokens
    assert ext["en"].tokens == base["en"].tokens


def test_nfc_and_byte_cap(data, tmp_path):
    docs = select_documents(data["vi"], max_bytes=1001)
    assert sum(len(d.encode("utf-8")) for d in docs) <= 1001
    assert all(d == unicodedata.normalize("NFC", d) for d in docs)
    docs = select_documents(data["vi"], max_docs=5, max_doc_bytes=101)
    assert len(docs) == 5 and all(95 <= len(d.encode("utf-8")) <= 101 for d in docs)


def test_cli_extend_convert_export_eval(tiny, data, tmp_path):
    runner = CliRunner()
    ext = tmp_path / "ext"
    res = runner.invoke(
        app,
        [
            "model",
            "extend",
            "--base",
            str(tiny["base"]),
            "--tokenizer",
            str(tiny["ext_tok"]),
            "--out",
            str(ext),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "subword-mean" in res.output and (ext / "model.safetensors").is_file()
    lit = tmp_path / "lit"
    res = runner.invoke(app, ["model", "to-litgpt", str(ext), "--out", str(lit)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(lit), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "parity" in res.output
    out_json = tmp_path / "bpb.json"
    res = runner.invoke(
        app,
        [
            "eval",
            "bpb",
            str(tiny["base"]),
            str(tmp_path / "hf"),
            "--data",
            f"vi={data['vi'][0]}",
            "--max-docs",
            "2",
            "--seq-len",
            "64",
            "--json",
            str(out_json),
        ],
    )
    assert res.exit_code == 0, res.output
    scores = json.loads(out_json.read_text())
    assert set(scores) == {str(tiny["base"]), str(tmp_path / "hf")}


def test_cli_errors_are_one_line(tiny, tmp_path):
    from vinasmol_core.cli import run_app

    small = tmp_path / "small"
    from vinasmol_core.builtin.tiny import build_tiny_tokenizer

    build_tiny_tokenizer(small, vocab_size=300)
    import sys

    argv = sys.argv
    sys.argv = [
        "vinasmol",
        "model",
        "extend",
        "--base",
        str(tiny["base"]),
        "--tokenizer",
        str(small),
        "--out",
        str(tmp_path / "out"),
    ]
    try:
        with pytest.raises(SystemExit) as exc:
            run_app(app)
    finally:
        sys.argv = argv
    assert exc.value.code == 1
    assert not (tmp_path / "out").exists()
