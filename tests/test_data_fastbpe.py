"""The cached fast path encodes exactly like the real tokenizer, or is not used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.data_fixtures import sample_corpora, tiny_tokenizer, write_jsonl
from vinasmol_core.data import PrepareSettings, SourceSpec, prepare_dataset
from vinasmol_core.data.fastbpe import MIN_PIECE_CHARS, FastByteLevelBPE, fast_path_shape
from vinasmol_core.data.shards import load_npy
from vinasmol_core.tokenizer.text import bytes_to_unicode

TRICKY = [
    "Hello world", "  two leading spaces", "trailing spaces   ", "a  b   c    d", "tab\there\t\tand\t",
    "line\nbreak \n next\n\n  indented\n    deeper  \n", "abc123 456 7,890.12 x1y2", " 9 lives", "1 2  3",
    "don't they'll we've I'm she's 'quoted' ''", "!!! ?? ... --- (x) [y] {z}", "Hà Nội, Việt Nam 2024.",
    "北京 是 中国 的首都。", "emoji 🙂🙂 ok", "e\u0301 combining", "nbsp\u00a0here and\u3000ideographic",
    "literal <|endoftext|> inside", "x <|im_start|>y", "", " ", "\n", "   \n  \t ", "a", "٣٤٥ ¹²³ Ⅻ",
    "def f(x):\n    return x  # comment\n\n\nclass A:\n\tpass\n", "word.\n\nWord", "  \u2028 sep",
    "a\x1cb \x1d c\x85d \x0be\x0c f\r\ng", "x\u200by \u200b z\ufeff",
    "runs  before\n\nletters,\t\tpunct  (x),  digits  42, ¹²  Ⅻ and  \U0001d2c0 (new in Unicode 15)",
    "trailing run at the end  ", "\n\n\n", "  9", "\t\t'quote  's",
    "the encoder's unused special token <|vinasmol:unused|> is ordinary text",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings drawn from whitespace of every kind, letters, digits, marks and punctuation."""
    import random

    rng = random.Random(seed)
    alphabet = list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2000\u2028\u3000") + list("aZéđ1٣¹Ⅻ'sltvmd.,!-_") + \
        ["\u0301", "\u200b", "中", "🙂", "'s", "'ll", "  ", "\n\n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _variant(src: Path, dst: Path, change: dict) -> Path:
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data.update(change)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_tokenizer(tmp_path_factory)
    root = tmp_path_factory.mktemp("tok-variants")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "digits+bytelevel": base,
        "bytelevel": _variant(base, root / "bl", {"pre_tokenizer": byte_level}),
        "nfc": _variant(base, root / "nfc", {"normalizer": {"type": "NFC"}}),
    }


@pytest.mark.parametrize("variant", ["digits+bytelevel", "bytelevel", "nfc"])
def test_fast_path_equals_tokenizer(tmp_path_factory: pytest.TempPathFactory, tokenizers: dict[str, Path],
                                    variant: str) -> None:
    path = tokenizers[variant] / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    fast = FastByteLevelBPE.create(tok, path, np.dtype(np.uint16))
    assert fast is not None
    texts = list(TRICKY) + _random_texts(400)
    for f in sample_corpora(tmp_path_factory).values():
        texts += [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines()[:15]]
    # Every text cut at its whitespace runs and encoded without the lookahead; the default, where
    # texts with short pieces use the full pattern; the full pattern alone; the default again, warm.
    for cut, min_piece_chars in ((True, 0), (True, MIN_PIECE_CHARS), (False, 0), (True, MIN_PIECE_CHARS)):
        fast.cut_whitespace_runs, fast.min_piece_chars = cut, min_piece_chars
        flat, lengths = fast.encode(texts, eos_id=0)
        expected = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        assert lengths.tolist() == [len(e) + 1 for e in expected]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, ids in enumerate(expected):
            assert flat[offsets[i] : offsets[i + 1]].tolist() == ids + [0], repr(texts[i])


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def _bpe(model: dict | None = None, **parts: object) -> dict:
    return {"model": {"type": "BPE", **(model or {})}, "pre_tokenizer": _BYTE_LEVEL, **parts}


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ({"model": {"type": "WordPiece"}}, "model is not BPE"),
        ({"pre_tokenizer": _BYTE_LEVEL}, "model is not BPE"),
        (_bpe({"dropout": 0.1}), "BPE dropout"),
        (_bpe({"continuing_subword_prefix": "##"}), "subword prefix/suffix"),
        (_bpe({"end_of_word_suffix": "</w>"}), "subword prefix/suffix"),
        (_bpe({"ignore_merges": True}), "ignore_merges (whole words looked up before merging)"),
        (_bpe(normalizer={"type": "Lowercase"}), "normaliser other than NFC"),
        (_bpe(normalizer={"type": "NFKC"}), "normaliser other than NFC"),
        (
            _bpe(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}),
            "normaliser other than NFC",
        ),
        (_bpe(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer is not [Digits(individual)] + ByteLevel"),
        (_bpe(pre_tokenizer=None), "pre-tokenizer is not [Digits(individual)] + ByteLevel"),
        (
            _bpe(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, _BYTE_LEVEL]}),
            "pre-tokenizer is not [Digits(individual)] + ByteLevel",
        ),
        (
            _bpe(pre_tokenizer={"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": False}, _BYTE_LEVEL]}),
            "pre-tokenizer is not [Digits(individual)] + ByteLevel",
        ),
        (
            _bpe(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}),
            "ByteLevel with prefix space or without regex",
        ),
        (
            _bpe(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}),
            "ByteLevel with prefix space or without regex",
        ),
    ],
)
def test_unsupported_shapes_are_refused(shape: dict, reason: str) -> None:
    """Each unsupported shape is refused with the reason that names what is unsupported."""
    assert fast_path_shape(shape) == (reason, False, False)


@pytest.mark.parametrize(
    ("shape", "digits", "nfc"),
    [
        (_bpe(), False, False),
        (_bpe({"dropout": 0.0, "continuing_subword_prefix": "", "ignore_merges": False}), False, False),
        (_bpe(normalizer={"type": "NFC"}), False, True),
        (_bpe(normalizer={"type": "Sequence", "normalizers": []}), False, False),
        (_bpe(pre_tokenizer={"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]}), True, False),
        (
            _bpe(
                normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}]},
                pre_tokenizer={"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]},
            ),
            True,
            True,
        ),
    ],
)
def test_supported_shapes_report_digits_and_nfc(shape: dict, digits: bool, nfc: bool) -> None:
    assert fast_path_shape(shape) == (None, digits, nfc)


def test_disagreement_falls_back_to_the_tokenizer(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tiny_tokenizer(tmp_path_factory)
    src = write_jsonl(tmp_path / "en.jsonl", [{"id": str(i), "text": f"Some English text number {i}, ok."}
                                              for i in range(40)])
    spec = [SourceSpec(name="s", lang="en", paths=(str(src),))]
    real = prepare_dataset(spec, tok, tmp_path / "real", PrepareSettings(val_fraction=0.0, workers=0))
    original = FastByteLevelBPE.encode

    def broken(self: FastByteLevelBPE, texts: list[str], eos_id: int,
               **kwargs: bool) -> tuple[np.ndarray, np.ndarray]:
        flat, lengths = original(self, texts, eos_id, **kwargs)
        flat = flat.copy()
        flat[0] = (int(flat[0]) + 1) % 100
        return flat, lengths

    monkeypatch.setattr(FastByteLevelBPE, "encode", broken)
    again = prepare_dataset(spec, tok, tmp_path / "again", PrepareSettings(val_fraction=0.0, workers=0))
    assert again.token_counts == real.token_counts
    a = load_npy(tmp_path / "real" / "train" / "s" / "00000.npy")
    b = load_npy(tmp_path / "again" / "train" / "s" / "00000.npy")
    assert np.array_equal(a, b)


def test_unreachable_tokens_are_left_out(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Merges bc, then ab, then ab+c over the three bytes of one character: "abc" is never produced
    ("a" + "bc" is not a merge), while a rank-based BPE that kept it would join "a" and "bc"."""
    base = tiny_tokenizer(tmp_path_factory) / "tokenizer.json"
    data = json.loads(base.read_text(encoding="utf-8"))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    merged = {ch for m in merges for ch in "".join(m if isinstance(m, list) else m.split(" "))}
    byte_chars = bytes_to_unicode()
    char = next(ch for ch in map(chr, range(0x2600, 0x2700))
                if not {byte_chars[x] for x in ch.encode()} & merged)
    a, b, c = (byte_chars[x] for x in char.encode())
    for left, right in ((b, c), (a, b), (a + b, c)):
        vocab[left + right] = len(vocab)
        merges.append([left, right] if isinstance(merges[0], list) else f"{left} {right}")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.from_file(str(path))
    texts = [char, f" x{char}{char}y {char}"]
    expected = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert expected[0] == [vocab[a], vocab[b + c]]
    fast = FastByteLevelBPE.create(tok, path, np.dtype(np.uint16))
    assert fast is not None
    flat, lengths = fast.encode(texts, eos_id=0)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert [flat[offsets[i] : offsets[i + 1] - 1].tolist() for i in range(len(texts))] == expected
