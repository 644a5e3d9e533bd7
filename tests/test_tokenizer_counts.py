"""Word counting ("train tokenizer"): exact against the Rust pre-tokenizer on NFC text, streamed
from every supported source."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.tokenizer_helpers import read_docs, sample_data, scratch, tiny_base
from vinasmol_core.tokenizer import WordCounts, count_words, nfc
from vinasmol_core.tokenizer.corpus import iter_text_file
from vinasmol_core.tokenizer.counts import SMOLLM2_PRE_TOKENIZER, build_pre_tokenizer, segment_safe
from vinasmol_core.tokenizer.text import simple_pieces, to_byte_level

PRE = build_pre_tokenizer(SMOLLM2_PRE_TOKENIZER)
# The same pre-tokenizer wrapped once more: not recognised, so it takes the plain path.
WRAPPED = {"type": "Sequence", "pretokenizers": [SMOLLM2_PRE_TOKENIZER]}


def _direct(docs: list[str]) -> Counter[str]:
    """The definition: every NFC document through the Rust pre-tokenizer."""
    c: Counter[str] = Counter()
    for d in docs:
        c.update(p for p, _ in PRE.pre_tokenize_str(nfc(d)))
    return c


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": d}, ensure_ascii=False) + "\n")
    return path


_TRICKY = st.lists(
    st.sampled_from(list("ab Zđếưỹ'sStd09.,!?()-_\t\n\r\x0b\x0c\x1c\x85\xa0\u2000\u3000") +
                    ["e\u0301", "\u0323", "😀", "ß", "²", "١", "漢", "\u200b", "'ll", "  "]),
    max_size=40,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TRICKY, min_size=1, max_size=6))
@example(["Nguye\u0302\u0303n Văn A, 1967.\n\n  Hà Nội   ", "x\u2000\u0301y"])
def test_fast_and_plain_counting_equal_the_definition(docs: list[str]) -> None:
    path = _write_jsonl(scratch("hyp") / "c.jsonl", docs)
    want = _direct(docs)
    if not want:
        return
    assert segment_safe(SMOLLM2_PRE_TOKENIZER) and not segment_safe(WRAPPED)
    fast = count_words([path], workers=1)
    plain = count_words([path], pre_tokenizer=WRAPPED, workers=1)
    assert fast.words == dict(want)
    assert plain.words == dict(want)
    assert fast.stats.whitespace_words == plain.stats.whitespace_words


@settings(max_examples=300, deadline=None)
@given(_TRICKY)
def test_python_split_matches_rust_where_it_applies(segment: str) -> None:
    pieces = simple_pieces(segment, "individual")
    if pieces is not None:
        assert [to_byte_level(p) for p in pieces] == [p for p, _ in PRE.pre_tokenize_str(segment)]


def test_parallel_counting_of_a_multi_batch_corpus_is_exact(monkeypatch) -> None:  # noqa: ANN001
    import vinasmol_core.tokenizer.counts as counts_mod

    monkeypatch.setattr(counts_mod, "BATCH_CHARS", 20_000)
    paths = sample_data()
    docs = read_docs(paths["vi"]) + read_docs(paths["en"], limit=50)
    gz = scratch("gz") / "mixed.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    got = count_words([gz], workers=2)
    assert got.words == dict(_direct(docs))
    assert got.stats.documents == len(docs)
    assert got.stats.whitespace_words == sum(len(d.split()) for d in docs)
    assert got.stats.vietnamese_letters > 0


def test_text_parquet_and_dataset_sources_count_the_same(monkeypatch) -> None:  # noqa: ANN001
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = read_docs(sample_data()["vi"], limit=60)
    want = dict(_direct(["\n".join(docs)]))
    folder = scratch("sources")
    txt = folder / "corpus.txt"
    txt.write_text("\n".join(docs), encoding="utf-8")
    # Small blocks: the reader must cut between blocks without changing any piece.
    blocks = list(iter_text_file(txt, block_bytes=300))
    assert len(blocks) > 10
    assert "".join(blocks) == txt.read_text(encoding="utf-8")
    monkeypatch.setattr("vinasmol_core.tokenizer.corpus.TEXT_BLOCK_BYTES", 300)
    assert count_words([txt], workers=1).words == want
    pq.write_table(pa.table({"text": docs}), folder / "corpus.parquet")
    per_doc = dict(_direct(docs))
    assert count_words([folder / "corpus.parquet"], workers=1).words == per_doc
    ds = datasets.Dataset.from_dict({"text": docs})
    assert count_words(ds, workers=1).words == per_doc
    assert count_words(iter({"text": d} for d in docs), workers=1).words == per_doc


def test_word_counts_save_and_load_round_trip() -> None:
    counts = count_words([sample_data()["vi"]], pre_tokenizer=tiny_base(), workers=1)
    folder = scratch("counts")
    path = counts.save(folder)
    loaded = WordCounts.load(folder)
    assert loaded.words == counts.words
    assert loaded.pre_tokenizer == counts.pre_tokenizer
    assert loaded.stats == counts.stats
    assert counts.info(path).sha256 == counts.info(folder).sha256
    assert counts.save(scratch("counts2")).read_bytes() == path.read_bytes()


def test_train_tokenizer_streams_hub_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The word counter reads a hub corpus's rows as they come: no step holds them all at once."""
    import tasks.tokenizer
    import vinasmol_core.data.readers
    import vinasmol_core.tokenizer
    from tasks.common import corpus_rows
    from vinasmol_core.plan.recipe import CorpusSpec, TokenizerSection

    pulled = [0]

    def records(spec):  # noqa: ANN001, ANN202 - a hub stream of 10,000 rows that counts what is read
        for i in range(10_000):
            pulled[0] += 1
            yield f"vi-{i}", f"Câu số {i}."

    monkeypatch.setattr(vinasmol_core.data.readers, "iter_hf_records", records)
    hub = CorpusSpec(name="web", lang="vi", source={"kind": "hub", "dataset": "org/web",
                                                       "budget": {"documents": 10_000}})
    rows = iter(corpus_rows(hub, tmp_path, str(tmp_path), val_fraction=0.0))
    assert next(rows) == {"text": "Câu số 0."} and pulled[0] == 1

    seen: list[int] = []

    def count_words(items, text_field, pre_tokenizer):  # noqa: ANN001, ANN202
        for n, _ in enumerate(items, 1):
            seen.append(pulled[0] - n)  # rows read ahead of the counter
        raise _Counted

    class Store:
        def fetch(self, ref: str) -> Path:
            return tmp_path

    pulled[0] = 0
    monkeypatch.setattr(vinasmol_core.tokenizer, "count_words", count_words)
    monkeypatch.setattr(tasks.tokenizer, "open_store", lambda url: Store())
    with pytest.raises(_Counted):
        tasks.tokenizer.train_tokenizer.fn(base_model="b", corpora=[hub, hub], corpus_digests={},
                                           section=TokenizerSection(), store_url="memory://x",
                                           hub_mirror=str(tmp_path))
    assert len(seen) == 20_000 and max(seen) == 0


class _Counted(Exception):
    pass
