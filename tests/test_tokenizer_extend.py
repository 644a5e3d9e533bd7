"""Vocabulary extension: the base is kept intact, new tokens are reachable merges that are
produced, NFC inside the tokenizer, lossless round trip, transformers agrees."""

from __future__ import annotations

import functools
import json
import unicodedata

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.tokenizer_helpers import (
    EXACT_TARGET,
    extended,
    read_docs,
    sample_data,
    scratch,
    tiny_base,
    vi_counts,
)
from vinasmol_core.tokenizer import extend_tokenizer, nfc
from vinasmol_core.tokenizer.base import BaseTokenizer, parse_merges


def _json(folder) -> dict:  # noqa: ANN001
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def test_base_ids_strings_merges_and_pipeline_are_kept() -> None:
    base, ext = _json(tiny_base()), _json(extended())
    base_vocab, ext_vocab = base["model"]["vocab"], ext["model"]["vocab"]
    assert len(ext_vocab) == EXACT_TARGET
    for token, idx in base_vocab.items():
        assert ext_vocab[token] == idx
    base_merges = parse_merges(base["model"]["merges"], "base")
    ext_merges = parse_merges(ext["model"]["merges"], "ext")
    assert ext_merges[: len(base_merges)] == base_merges
    assert len(ext_merges) == len(base_merges) + (EXACT_TARGET - len(base_vocab))
    for key in ("added_tokens", "pre_tokenizer", "decoder", "post_processor"):
        assert ext[key] == base[key], key
    assert ext["normalizer"] == {"type": "NFC"}
    assert base["normalizer"] is None


def test_new_tokens_are_reachable_merges_not_added_tokens() -> None:
    base = BaseTokenizer.load(tiny_base())
    ext = _json(extended())
    id_to_token = {i: t for t, i in ext["model"]["vocab"].items()}
    new_merges = parse_merges(ext["model"]["merges"], "ext")[len(base.merges):]
    made = set()
    for left, right in new_merges:
        # Each merge combines tokens that exist before it and makes a new string.
        assert left in base.tokens or left in made
        assert right in base.tokens or right in made
        assert left + right not in base.tokens and left + right not in made
        made.add(left + right)
    assert made == {id_to_token[i] for i in range(base.vocab_size, EXACT_TARGET)}
    assert len(ext["added_tokens"]) == len(base.data["added_tokens"])


def test_every_new_token_is_produced_on_the_training_corpus() -> None:
    tok = Tokenizer.from_file(str(extended() / "tokenizer.json"))
    seen: set[int] = set()
    for enc in tok.encode_batch(read_docs(sample_data()["vi"]), add_special_tokens=False):
        seen.update(enc.ids)
    new = set(range(1024, EXACT_TARGET))
    assert new <= seen, f"{len(new - seen)} new tokens never produced"


def test_extension_cuts_vietnamese_cost_and_never_raises_english_or_code() -> None:
    base = Tokenizer.from_file(str(tiny_base() / "tokenizer.json"))
    ext = Tokenizer.from_file(str(extended() / "tokenizer.json"))
    for lang in ("vi", "en", "code"):
        docs = read_docs(sample_data()[lang], limit=40, max_chars=3000)
        for d in docs:
            assert len(ext.encode(d).ids) <= len(base.encode(d).ids)
    vi = read_docs(sample_data()["vi"])
    n_base = sum(len(e.ids) for e in base.encode_batch(vi))
    n_ext = sum(len(e.ids) for e in ext.encode_batch(vi))
    assert n_ext < 0.6 * n_base


def test_shortfall_is_reported_when_the_corpus_supports_fewer_tokens() -> None:
    out = scratch("short") / "tok"
    result = extend_tokenizer(tiny_base(), vi_counts(), 1024 + 64 * 40, out)
    assert result.shortfall is not None and "supports only" in result.shortfall
    assert result.vocab_size == 1024 + result.new_tokens < 1024 + 64 * 40
    report = json.loads((out / "tokenizer_extension.json").read_text())
    assert report["shortfall"] == result.shortfall
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == result.vocab_size


def test_extension_is_deterministic() -> None:
    out = scratch("again") / "tok"
    result = extend_tokenizer(tiny_base(), vi_counts(), EXACT_TARGET, out)
    assert (out / "tokenizer.json").read_bytes() == (extended() / "tokenizer.json").read_bytes()
    assert result.tokenizer_sha256 and result.new_tokens == EXACT_TARGET - 1024


@functools.cache
def _ext_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(extended() / "tokenizer.json"))


_UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_UNICODE)
@example("")
@example(unicodedata.normalize("NFD", "Tiếng Việt có dấu: người, đường, Nguyễn"))
@example("emoji 😀👍🏽🇻🇳 ❤️ and ZWJ 👩‍👩‍👧")
@example("control \x00\x01\x04\x1b\x7f\x85 chars\r\n\t")
@example("mixed Việt русский 漢字 العربية 123\u00a0456")
@example("  \n\n   leading and trailing   ")
def test_round_trip_is_nfc(text: str) -> None:
    tok = _ext_tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == nfc(text)


def test_nfc_matches_python_on_latin_and_vietnamese() -> None:
    for text in ("Vie\u0302\u0323t Nam", "Nguye\u0302\u0303n", "đường", "e\u0301"):
        assert nfc(text) == unicodedata.normalize("NFC", text)
        ids = _ext_tokenizer().encode(text).ids
        assert ids == _ext_tokenizer().encode(unicodedata.normalize("NFC", text)).ids


_ASCII = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=120)


@settings(max_examples=200, deadline=None)
@given(_ASCII)
@example("def f(x):\n    return x ** 2  # 1234\n")
def test_nfc_normaliser_changes_no_ascii_ids(text: str) -> None:
    data = _json(extended())
    data["normalizer"] = None
    without = _no_norm_tokenizer()
    assert _ext_tokenizer().encode(text).ids == without.encode(text).ids


@functools.cache
def _no_norm_tokenizer() -> Tokenizer:
    data = _json(extended())
    data["normalizer"] = None
    return Tokenizer.from_str(json.dumps(data))


def test_nfc_normaliser_changes_no_ids_of_ascii_corpora() -> None:
    without = _no_norm_tokenizer()
    for lang in ("en", "code"):
        docs = [d for d in read_docs(sample_data()[lang], limit=60, max_chars=5000) if d.isascii()]
        assert docs
        a = [e.ids for e in _ext_tokenizer().encode_batch(docs)]
        b = [e.ids for e in without.encode_batch(docs)]
        assert a == b


def test_autotokenizer_agrees_with_tokenizers_and_keeps_base_conventions() -> None:
    from transformers import AutoTokenizer

    from vinasmol_core.tokenizer.extend import check_transformers_parity

    folder = extended()
    check_transformers_parity(folder)
    hf = AutoTokenizer.from_pretrained(str(folder))
    rust = _ext_tokenizer()
    for lang in ("vi", "en", "code"):
        for doc in read_docs(sample_data()[lang], limit=10, max_chars=3000):
            ids = rust.encode(doc, add_special_tokens=False).ids
            assert hf(doc, add_special_tokens=False)["input_ids"] == ids
    nfd = unicodedata.normalize("NFD", "Người Việt")
    assert hf(nfd)["input_ids"] == rust.encode("Người Việt").ids
    for attr in ("bos_token", "eos_token", "unk_token"):
        assert getattr(hf, attr) == "<|endoftext|>"
    assert hf.convert_tokens_to_ids("<|endoftext|>") == 0
    assert len(hf) == EXACT_TARGET


def test_missing_byte_symbols_are_added_so_no_character_is_dropped() -> None:
    """A base whose alphabet lacks bytes (trained without the full initial alphabet) would drop
    characters; the extension completes the alphabet first."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    base_dir = scratch("partial-alphabet")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(read_docs(sample_data()["en"]), trainer=trainer)
    tok.save(str(base_dir / "tokenizer.json"))
    base = BaseTokenizer.load(base_dir)
    missing = base.missing_byte_symbols()
    assert len(missing) > 50
    text = "ctrl \x04 and Việt 😀"
    assert tok.decode(tok.encode(text).ids) != text  # the base loses characters
    from vinasmol_core.tokenizer import count_words

    counts = count_words([sample_data()["vi"]], pre_tokenizer=base_dir)
    target = (base.vocab_size + len(missing)) // 64 * 64 + 128
    result = extend_tokenizer(base_dir, counts, target, base_dir / "ext")
    assert len(result.byte_tokens) == len(missing)
    ext = Tokenizer.from_file(str(base_dir / "ext" / "tokenizer.json"))
    assert ext.decode(ext.encode(text).ids) == text
