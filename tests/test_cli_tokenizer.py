"""Bad input gives a clear error, a non-zero exit, and nothing written or published."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from tests.tokenizer_helpers import sample_data, scratch, tiny_base, vi_counts
from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.tokenizer import count_words, extend_tokenizer


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    from vinasmol_core.cli import main

    monkeypatch.setattr(sys, "argv", ["vinasmol", "tokenizer", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0), capsys.readouterr().err


def _store_is_empty(url: str) -> bool:
    from vinasmol_core.store import ArtifactStore

    root = Path(url.removeprefix("file://"))
    manifests = list((root / "manifests").glob("*")) if (root / "manifests").exists() else []
    return not manifests and not ArtifactStore(url).list_refs()


def _extend_cli(monkeypatch, capsys, corpus: Path, out: Path, store: str, *extra: str):  # noqa: ANN001, ANN202
    return _cli(monkeypatch, capsys, "extend", "--base", str(tiny_base()), "--corpus", str(corpus),
                "--out", str(out), "--store", store, "--eval", f"vi={sample_data()['vi']}", *extra)


def test_empty_corpus(monkeypatch, capsys) -> None:  # noqa: ANN001
    folder = scratch("empty")
    empty = folder / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(VinaSmolError, match="empty"):
        count_words([empty])
    store = (folder / "store").as_uri()
    code, err = _extend_cli(monkeypatch, capsys, empty, folder / "out", store)
    assert code == 1 and "error:" in err and "empty" in err
    assert not (folder / "out").exists()
    assert _store_is_empty(store)


def test_corpus_without_vietnamese(monkeypatch, capsys) -> None:  # noqa: ANN001
    folder = scratch("english")
    english = sample_data()["en"]
    counts = count_words([english], pre_tokenizer=tiny_base())
    with pytest.raises(VinaSmolError, match="no Vietnamese text"):
        extend_tokenizer(tiny_base(), counts, 1088, folder / "direct")
    assert not (folder / "direct").exists()
    store = (folder / "store").as_uri()
    code, err = _extend_cli(monkeypatch, capsys, english, folder / "out", store)
    assert code == 1 and "no Vietnamese text" in err
    assert not (folder / "out").exists() and _store_is_empty(store)


def test_too_little_vietnamese_for_new_tokens() -> None:
    folder = scratch("tiny-vi")
    small = folder / "small.jsonl"
    small.write_text(json.dumps({"text": "Xin chào. Tôi là người Việt."}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    counts = count_words([small], pre_tokenizer=tiny_base())
    with pytest.raises(VinaSmolError, match="supports only"):
        extend_tokenizer(tiny_base(), counts, 1088, folder / "out")
    assert not (folder / "out").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "txt"])
def test_invalid_utf8_names_file_and_offset(monkeypatch, capsys, kind: str) -> None:  # noqa: ANN001
    folder = scratch("utf8")
    good = json.dumps({"text": "Hà Nội"}, ensure_ascii=False).encode() + b"\n"
    bad_line = b'{"text": "ab\xffcd"}\n'
    data = good * 3 + bad_line if kind != "txt" else "Hà Nội\n".encode() * 3 + b"ab\xffcd\n"
    offset = data.index(b"\xff")
    path = folder / f"corpus.{kind}"
    path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
    with pytest.raises(VinaSmolError) as exc:
        count_words([path])
    message = str(exc.value)
    assert str(path) in message and f"byte offset {offset}" in message and "UTF-8" in message
    store = (folder / "store").as_uri()
    code, err = _extend_cli(monkeypatch, capsys, path, folder / "out", store)
    assert code == 1 and f"byte offset {offset}" in err
    assert not (folder / "out").exists() and _store_is_empty(store)


def test_missing_file_and_bad_json_are_named() -> None:
    folder = scratch("missing")
    with pytest.raises(VinaSmolError, match="does not exist"):
        count_words([folder / "nope.jsonl"])
    bad = folder / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(VinaSmolError, match=r"bad\.jsonl: line 2"):
        count_words([bad])


@pytest.mark.parametrize("target", [1090, 1024, 960])
def test_bad_target_vocab_size(monkeypatch, capsys, target: int) -> None:  # noqa: ANN001
    folder = scratch("target")
    with pytest.raises(ConfigError, match="target_vocab_size"):
        extend_tokenizer(tiny_base(), vi_counts(), target, folder / "direct")
    store = (folder / "store").as_uri()
    code, err = _extend_cli(monkeypatch, capsys, sample_data()["vi"], folder / "out", store,
                            "--target-vocab-size", str(target))
    assert code == 1 and "target_vocab_size" in err
    assert not (folder / "out").exists() and not (folder / "direct").exists() and _store_is_empty(store)


def _non_byte_level_bases(folder: Path) -> list[Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in sample_data()["en"].read_text().splitlines()[:50]]
    out = []
    word = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False))
    (folder / "wordlevel").mkdir()
    word.save(str(folder / "wordlevel" / "tokenizer.json"))
    out.append(folder / "wordlevel")
    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Metaspace()
    spm.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                       show_progress=False))
    (folder / "metaspace").mkdir()
    spm.save(str(folder / "metaspace" / "tokenizer.json"))
    out.append(folder / "metaspace")
    return out


def test_base_that_is_not_byte_level_bpe(monkeypatch, capsys) -> None:  # noqa: ANN001
    folder = scratch("notbpe")
    for base in _non_byte_level_bases(folder):
        with pytest.raises(VinaSmolError, match="byte-level BPE"):
            extend_tokenizer(base, vi_counts(), 1088, folder / "direct")
        assert not (folder / "direct").exists()
        store = (folder / f"store-{base.name}").as_uri()
        code, err = _cli(monkeypatch, capsys, "extend", "--base", str(base), "--corpus",
                         str(sample_data()["vi"]), "--out", str(folder / "out"), "--store", store)
        assert code == 1 and "byte-level BPE" in err
        assert not (folder / "out").exists() and _store_is_empty(store)
    with pytest.raises(VinaSmolError, match="does not exist"):
        extend_tokenizer(folder / "nothing-here", vi_counts(), 1088, folder / "direct")


def test_counts_from_another_pre_tokenizer_are_refused() -> None:
    folder = scratch("otherpre")
    counts = count_words([sample_data()["vi"]],
                         pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                        "use_regex": True})
    with pytest.raises(VinaSmolError, match="another pre-tokenizer"):
        extend_tokenizer(tiny_base(), counts, 1088, folder / "out")
    assert not (folder / "out").exists()


def test_existing_output_is_not_overwritten() -> None:
    folder = scratch("exists")
    out = folder / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VinaSmolError, match="already exists"):
        extend_tokenizer(tiny_base(), vi_counts(), 1088, out)
    assert (out / "keep.txt").read_text() == "mine"
