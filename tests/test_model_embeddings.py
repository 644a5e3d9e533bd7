"""Vocabulary extension: new rows are subword means, old rows untouched, embeddings stay tied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from tests.model_fixtures import extend_tokenizer_with_merges, shared_tiny
from vinasmol_core.builtin.sample_corpus import sample_texts
from vinasmol_core.builtin.tiny import build_tiny_tokenizer
from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.model import extend_model, mean_rows, segment_tokens
from vinasmol_core.model.embeddings import token_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def _embedding(folder: Path) -> torch.Tensor:
    """The input embedding table of an HF model folder."""
    return load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]


def _tok(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def _reference_segment(base: Tokenizer, new: Tokenizer, token_id: int) -> list[int]:
    """Segmentation computed independently: the base tokenizer on the token's text when it is valid
    UTF-8, else the base BPE on the token's byte string."""
    token = new.id_to_token(token_id)
    raw = token_bytes(token)
    assert raw is not None
    try:
        return base.encode(raw.decode("utf-8"), add_special_tokens=False).ids
    except UnicodeDecodeError:
        return [t.id for t in base.model.tokenize(token)]


def test_new_rows_are_exact_subword_means_and_old_rows_identical(tiny):
    base_w = load_file(str(tiny["base"] / "model.safetensors"))["model.embed_tokens.weight"]
    ext_state = load_file(str(tiny["ext"] / "model.safetensors"))
    ext_w = ext_state["model.embed_tokens.weight"]
    base_tok, new_tok = _tok(tiny["base"]), _tok(tiny["ext_tok"])
    v_base, v_new = base_tok.get_vocab_size(), new_tok.get_vocab_size()
    assert v_new > v_base and ext_w.shape == (v_new, base_w.shape[1])
    assert torch.equal(ext_w[:v_base], base_w)  # bit-identical old rows
    partial = 0
    for token_id in range(v_base, v_new):
        seg = _reference_segment(base_tok, new_tok, token_id)
        assert len(seg) >= 2
        expected = base_w[seg].double().mean(0).float()
        assert torch.equal(ext_w[token_id], expected), token_id
        raw = token_bytes(new_tok.id_to_token(token_id))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
    assert partial > 0, "fixture should contain tokens that are partial UTF-8 characters"
    # a mean of pieces is not a copy of any one piece: new rows differ from each other
    assert len({tuple(r.tolist()) for r in ext_w[v_base:]}) == v_new - v_base


def test_extended_model_stays_tied(tiny):
    from transformers import AutoModelForCausalLM

    state = load_file(str(tiny["ext"] / "model.safetensors"))
    assert "lm_head.weight" not in state
    config = json.loads((tiny["ext"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == _tok(tiny["ext_tok"]).get_vocab_size()
    model = AutoModelForCausalLM.from_pretrained(str(tiny["ext"]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    info = json.loads((tiny["ext"] / "extension.json").read_text())
    assert info["new_token_ids"] == [info["base_vocab_size"], info["vocab_size"]]


def test_partial_utf8_token_segments_to_its_own_bytes(tiny):
    base_tok = _tok(tiny["base"])
    # "ế" is three bytes; its first two form a token that is not valid UTF-8 on its own
    token = "".join(ch for ch in "áº")  # byte-level spelling of b"\xe1\xba"
    assert token_bytes(token) == b"\xe1\xba"

    class Fake:
        def id_to_token(self, i):
            return token

        def get_added_tokens_decoder(self):
            return {}

    (seg,) = segment_tokens(base_tok, Fake(), [7])
    assert b"".join(token_bytes(base_tok.id_to_token(i)) for i in seg) == b"\xe1\xba"


def test_mean_rows_matches_a_loop():
    torch.manual_seed(0)
    w = torch.randn(50, 8)
    segments = [[1, 2, 3], [4], [5, 5, 6, 7], []]
    out = mean_rows(w, segments)
    for row, seg in zip(out[:3], segments[:3], strict=True):
        assert torch.allclose(row, w[seg].double().mean(0), atol=1e-12)
    assert torch.allclose(out[3], w.double().mean(0))


def test_translation_blend(tiny, tmp_path):
    new_tok, base_tok = _tok(tiny["ext_tok"]), _tok(tiny["base"])
    v_base = base_tok.get_vocab_size()
    # pick a new token that is a whole word and give it a translation
    target = None
    for token_id in range(v_base, new_tok.get_vocab_size()):
        raw = token_bytes(new_tok.id_to_token(token_id))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.startswith(" ") and text.strip().isalpha() and len(text.strip()) > 2:
            target = (token_id, text)
            break
    assert target is not None
    token_id, text = target
    tsv = tmp_path / "dict.tsv"
    tsv.write_text(f"# vi\ten\n{text.strip()}\tthe river\n", encoding="utf-8")
    out = extend_model(
        tiny["base"],
        tiny["ext_tok"],
        tmp_path / "blend",
        init="translation-blend",
        translations=tsv,
        blend=0.25,
    )
    blended, plain, base_w = (_embedding(folder) for folder in (out, tiny["ext"], tiny["base"]))
    trans_ids = base_tok.encode(" the river", add_special_tokens=False).ids
    expected = 0.75 * base_w[_reference_segment(base_tok, new_tok, token_id)].double().mean(0)
    expected += 0.25 * base_w[trans_ids].double().mean(0)
    assert torch.allclose(blended[token_id].double(), expected, atol=1e-6)
    assert not torch.equal(blended[token_id], plain[token_id])
    others = [i for i in range(v_base, blended.shape[0]) if i != token_id]
    assert torch.equal(blended[others], plain[others])  # no translation: subword mean kept
    assert json.loads((out / "extension.json").read_text())["translated_tokens"] == 1


def test_translation_blend_needs_a_source_and_valid_weight(tiny, tmp_path):
    with pytest.raises(ConfigError, match="translation"):
        extend_model(tiny["base"], tiny["ext_tok"], tmp_path / "x", init="translation-blend")
    with pytest.raises(ConfigError, match="blend"):
        extend_model(
            tiny["base"],
            tiny["ext_tok"],
            tmp_path / "x",
            init="translation-blend",
            translations=tmp_path,
            blend=1.5,
        )
    with pytest.raises(ConfigError, match="init"):
        extend_model(tiny["base"], tiny["ext_tok"], tmp_path / "x", init="random")
    assert not (tmp_path / "x").exists()


def test_tokenizer_that_is_not_an_extension_is_refused(tiny, tmp_path):
    # a tokenizer trained on other text: same size range, different ids
    other = build_tiny_tokenizer(tmp_path / "other", vocab_size=700)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VinaSmolError, match="not an extension"):
        extend_model(tiny["base"], other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_smaller_vocabulary_is_refused(tiny, tmp_path):
    small = build_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    with pytest.raises(VinaSmolError, match="smaller than the model"):
        extend_model(tiny["base"], small, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extension_of_extension_keeps_previous_rows(tiny, tmp_path):
    more = extend_tokenizer_with_merges(
        tiny["ext_tok"], tmp_path / "more", 10, sample_texts("vi", 40, seed=3)
    )
    out = extend_model(tiny["ext"], more, tmp_path / "ext2")
    first = load_file(str(tiny["ext"] / "model.safetensors"))["model.embed_tokens.weight"]
    second = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(second[: first.shape[0]], first)
    assert second.shape[0] == _tok(more).get_vocab_size()


def _tiny_seq2seq(folder: Path, tok_dir: Path, allowed: list[int]) -> Path:
    """A tiny T5 folder with the tiny tokenizer whose greedy output can only use the `allowed` ids
    (every other id is suppressed by its generation config), so what it answers is known in advance."""
    import shutil

    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    vocab = _tok(tok_dir).get_vocab_size()
    config = T5Config(
        vocab_size=vocab,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    GenerationConfig(
        decoder_start_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        suppress_tokens=[i for i in range(vocab) if i not in allowed],
    ).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tok_dir / name, folder / name)
    return folder


def test_seq2seq_translation_source_loads_a_local_model(tiny, tmp_path):
    """The seq2seq source loads an encoder-decoder from a folder, decodes one answer per word (across
    batches, in order), removes the output prefix, and answers None for an empty generation."""
    from vinasmol_core.model import Seq2SeqTranslations

    base_tok = _tok(tiny["tok"])
    piece = base_tok.token_to_id("ver")
    assert piece is not None and piece != 0
    folder = _tiny_seq2seq(tmp_path / "t5", tiny["tok"], allowed=[piece])
    words = ["sông", "núi", "biển"]

    source = Seq2SeqTranslations(folder, max_new_tokens=3, batch_size=2, strip_prefix="")
    assert source.translate(words) == ["ververver"] * 3  # three tokens each, two batches
    stripped = Seq2SeqTranslations(folder, max_new_tokens=3, batch_size=2, strip_prefix="ver ")
    assert stripped.translate(words) == ["verver"] * 3

    eos_only = _tiny_seq2seq(tmp_path / "t5-eos", tiny["tok"], allowed=[0])
    assert Seq2SeqTranslations(eos_only, max_new_tokens=3).translate(words) == [None] * 3


def test_seq2seq_translations_blend_the_rows_they_translate(tiny, tmp_path):
    """translation-blend with a seq2seq source: every new token with letters gets the translation's
    base rows blended into its subword mean; tokens without letters keep the plain mean."""
    from vinasmol_core.model import Seq2SeqTranslations
    from vinasmol_core.model.embeddings import token_text

    base_tok, new_tok = _tok(tiny["tok"]), _tok(tiny["ext_tok"])
    piece = base_tok.token_to_id("ver")
    folder = _tiny_seq2seq(tmp_path / "t5", tiny["tok"], allowed=[piece])
    source = Seq2SeqTranslations(folder, max_new_tokens=2, strip_prefix="")
    out = extend_model(
        tiny["base"],
        tiny["ext_tok"],
        tmp_path / "blend",
        init="translation-blend",
        translator=source,
        blend=0.5,
    )
    blended, plain, base_w = (_embedding(folder) for folder in (out, tiny["ext"], tiny["base"]))
    v_base = base_tok.get_vocab_size()
    assert torch.equal(blended[:v_base], plain[:v_base])

    translated = []
    for token_id in range(v_base, new_tok.get_vocab_size()):
        text = token_text(new_tok, token_id)
        if text is None or not any(ch.isalpha() for ch in text):
            assert torch.equal(blended[token_id], plain[token_id])
            continue
        translated.append(token_id)
        lead = text[: len(text) - len(text.lstrip())]
        trans_ids = base_tok.encode(lead + "verver", add_special_tokens=False).ids
        expected = 0.5 * plain[token_id].double() + 0.5 * base_w[trans_ids].double().mean(0)
        assert torch.allclose(blended[token_id].double(), expected, atol=1e-6)
        assert not torch.allclose(blended[token_id], plain[token_id], atol=1e-6)
    assert len(translated) > 10
    assert json.loads((out / "extension.json").read_text())["translated_tokens"] == len(translated)
