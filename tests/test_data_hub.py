"""Hub corpora read from a hub mirror (a folder in the hub's layout that the tests write) through the
same code path as the hub: `datasets.load_dataset(folder, config, split=..., streaming=True)`, up to
the corpus budget; validation documents; digests; a prepared dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common import corpus_digest, corpus_rows, hub_source_spec, hub_val_file
from tests.data_fixtures import tiny_tokenizer
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.data import PrepareSettings, prepare_dataset
from vinasmol_core.data.readers import ReadCounters, iter_batches, open_hf_dataset
from vinasmol_core.data.worker import split_is_val
from vinasmol_core.plan.hub_mirror import write_dataset_config
from vinasmol_core.plan.recipe import CorpusSpec

pytestmark = pytest.mark.slow  # imports `datasets` (several seconds)

VI = [f"Bài viết số {i} về lịch sử và văn hóa Việt Nam, với nhiều câu dài hơn một chút." for i in range(300)]
EN = [f"Article number {i} about the history of science, in plain English sentences." for i in range(200)]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    folder = root / "org" / "web"
    write_dataset_config(folder, "vie_Latn", {
        "train": ({"id": f"vi-{i}", "text": t} for i, t in enumerate(VI)),
        "test": ({"id": f"vt-{i}", "text": f"Câu kiểm tra số {i}."} for i in range(20)),
    }, shard_rows=128)
    en = ({"id": f"en-{i}", "text": t} for i, t in enumerate(EN))
    write_dataset_config(folder, "eng_Latn", {"train": en})
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VINASMOL_CACHE", str(tmp_path / "cache" / "artifacts"))


def corpus(config: str = "vie_Latn", lang: str = "vi", **source: object) -> CorpusSpec:
    fields = {"kind": "hub", "dataset": "org/web", "config": config, "budget": {"documents": 10_000},
              **source}
    return CorpusSpec(name=f"web-{lang}", lang=lang, source=fields)


def texts(c: CorpusSpec, mirror: Path) -> list[str]:
    spec = hub_source_spec(c, str(mirror))
    return [t for b in iter_batches(spec, [], skip_bad_lines=False, counters=ReadCounters()) for t in b.texts]


def test_a_mirror_is_read_by_the_hub_code_path_config_by_config(mirror: Path) -> None:
    spec = hub_source_spec(corpus(), str(mirror))
    where = (spec.hf_dataset, spec.hf_path, spec.hf_config)
    assert where == ("org/web", str(mirror / "org" / "web"), "vie_Latn")
    assert type(open_hf_dataset(spec)).__name__ == "IterableDataset"  # streamed, never loaded whole
    assert texts(corpus(), mirror) == VI  # three shards, in order
    assert texts(corpus("eng_Latn", "en"), mirror) == EN
    batches = list(iter_batches(spec, [], skip_bad_lines=False, counters=ReadCounters()))
    assert batches[0].ids[:2] == ["vi-0", "vi-1"]  # the id field, not the location


def test_the_reader_stops_at_the_budget(mirror: Path) -> None:
    assert texts(corpus(budget={"documents": 7}), mirror) == VI[:7]
    size = len(VI[0].encode())
    # a byte budget stops at the first document that reaches it
    assert texts(corpus(budget={"bytes": 3 * size - 1}), mirror) == VI[:3]
    # a token budget is read as bytes at the language's (or the budget's own) bytes per token
    assert texts(corpus(budget={"tokens": 10, "bytes_per_token": size / 10}), mirror) == VI[:1]
    rows = list(corpus_rows(corpus(budget={"documents": 50}), Path("unused"), str(mirror), max_docs=5,
                            val_fraction=0.0))
    assert rows == [{"text": t} for t in VI[:5]]


def test_unknown_config_and_missing_mirror_folder_are_named(mirror: Path, tmp_path: Path) -> None:
    with pytest.raises(VinaSmolError, match=r"'web-vi': cannot open dataset .*org/web.*'zzz_Latn' not found"):
        texts(corpus("zzz_Latn"), mirror)
    with pytest.raises(VinaSmolError, match="source 'web-vi': cannot open dataset"):
        texts(corpus(), tmp_path)


def test_validation_documents_come_from_the_val_split_or_the_held_out_share(mirror: Path) -> None:
    path = hub_val_file(corpus(val_split="test", val_documents=5), 0.01, str(mirror))
    assert path.read_text(encoding="utf-8").count("\n") == 5 and "Câu kiểm tra số 4." in path.read_text()
    held = hub_val_file(corpus(val_documents=1000), 0.2, str(mirror))
    ids = [line.split('"id": "')[1].split('"')[0] for line in held.read_text().splitlines()]
    expected = [f"vi-{i}" for i in range(len(VI)) if split_is_val("web-vi", f"vi-{i}", 0.2)]
    assert ids == expected and 30 < len(ids) < 100  # exactly the documents the data step holds out
    assert hub_val_file(corpus(val_documents=1000), 0.2, str(mirror)) == held  # cached


def test_the_tokenizer_rows_leave_out_the_held_out_validation_documents(mirror: Path) -> None:
    c = corpus(val_documents=1000)
    held = {line.split('"text": "')[1].split('"')[0]
            for line in hub_val_file(c, 0.2, str(mirror)).read_text(encoding="utf-8").splitlines()}
    rows = {r["text"] for r in corpus_rows(c, Path("unused"), str(mirror), val_fraction=0.2)}
    assert held and not held & rows  # no validation document is a tokenizer-training row
    assert held | rows == set(VI)  # and every other document is
    assert {r["text"] for r in corpus_rows(c, Path("unused"), str(mirror), val_fraction=0.0)} == set(VI)


def test_a_non_utf8_hub_shard_is_skipped_and_counted_when_asked(
        mirror: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import json

    spec = hub_source_spec(corpus(), str(mirror))
    counters = ReadCounters()
    same = [t for b in iter_batches(spec, [], skip_bad_lines=True, counters=counters) for t in b.texts]
    assert same == VI and counters.bad_lines_skipped == 0  # shard by shard: the same rows, in order
    folder = tmp_path / "org" / "raw"
    folder.mkdir(parents=True)
    good = [VI[:2], [], VI[2:3]]
    for i, docs in enumerate(good):
        lines = [json.dumps({"id": f"{i}-{j}", "text": t}, ensure_ascii=False) for j, t in enumerate(docs)]
        (folder / f"train-{i}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    latin1 = '{"id": "c", "text": "Tiéng Viét"}\n{"id": "d", "text": "x"}\n'.encode("latin-1")
    (folder / "train-1.jsonl").write_bytes(latin1)  # not UTF-8
    raw = CorpusSpec(name="raw", lang="vi", source={"kind": "hub", "dataset": "org/raw",
                                                    "budget": {"documents": 100}})
    spec = hub_source_spec(raw, str(tmp_path))
    with pytest.raises(VinaSmolError, match=r"'raw': reading .*org/raw failed after 2 rows: 'utf-8' codec .*"
                                            r"pass --skip-bad-lines"):
        list(iter_batches(spec, [], skip_bad_lines=False, counters=ReadCounters()))
    counters = ReadCounters()
    read = [t for b in iter_batches(spec, [], skip_bad_lines=True, counters=counters) for t in b.texts]
    assert read == VI[:3] and counters.bad_lines_skipped == 1
    assert "shard 2 of 3 (train-1.jsonl): not valid UTF-8" in counters.bad_line_examples[0]
    tok = tiny_tokenizer(tmp_path_factory)
    settings = PrepareSettings(val_fraction=0.0, workers=0, skip_bad_lines=True, curation=None)
    info = prepare_dataset([spec], tok, tmp_path / "ds", settings)
    assert info.sources["raw"].docs_read == 3 and info.sources["raw"].bad_lines_skipped == 1


def test_the_digest_follows_the_mirror_content(mirror: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mirror, copy)
    c = corpus()
    assert corpus_digest(c, str(mirror)) == corpus_digest(c, str(copy))  # location is not content
    write_dataset_config(copy / "org" / "web", "vie_Latn", {"train": [{"id": "x", "text": "khác"}]})
    assert corpus_digest(c, str(mirror)) != corpus_digest(c, str(copy))
    assert corpus_digest(corpus(budget={"documents": 5}), str(mirror)) != corpus_digest(c, str(mirror))


def test_a_dataset_changed_upstream_gets_new_keys_a_new_build_and_new_validation_documents(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import os

    # `load_dataset("acme/corpus")` reads a folder of that name first, exactly like the hub repo
    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer(tmp_path_factory)
    c = CorpusSpec(name="web", lang="en", source={"kind": "hub", "dataset": "acme/corpus",
                                                  "budget": {"documents": 40}})
    seen = []
    for version in ("V1", "V2"):
        rows = [{"id": f"d{i}", "text": f"{version}: " + " ".join(f"w{i}x{j}" for j in range(200))}
                for i in range(40)]
        write_dataset_config(Path("acme/corpus"), None, {"train": rows})
        info = prepare_dataset([hub_source_spec(c)], tok, tmp_path / f"out-{version}",
                               PrepareSettings(curation=None, val_fraction=0.1, workers=0),
                               store=f"file://{tmp_path / 'store'}")
        val = hub_val_file(c, 0.1)
        assert val.is_relative_to(Path(os.environ["VINASMOL_CACHE"]))  # inside the cache folder
        assert json.loads(val.read_text().splitlines()[0])["text"].startswith(f"{version}: ")
        assert not info.reused
        seen.append((corpus_digest(c), info.key, val))
    assert len({s[0] for s in seen}) == len({s[1] for s in seen}) == len({s[2] for s in seen}) == 2


def test_a_mirror_corpus_prepares_into_a_dataset(mirror: Path, tmp_path_factory: pytest.TempPathFactory,
                                                 tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path_factory)
    sources = [hub_source_spec(corpus(budget={"documents": 100}), str(mirror)),
               hub_source_spec(corpus("eng_Latn", "en"), str(mirror))]
    info = prepare_dataset(sources, tok, tmp_path / "ds", PrepareSettings(val_fraction=0.0, workers=0))
    assert info.sources["web-vi"].docs_read == 100 and info.sources["web-en"].docs_read == len(EN)
    assert info.token_counts["vi"] > 0 and info.token_counts["en"] > 0


def test_the_distill_init_reads_no_held_out_validation_document(mirror: Path) -> None:
    from tasks.model import distill_corpus
    from vinasmol_core.plan.recipe import EmbeddingInitSection

    c = corpus(val_documents=1000)
    held = {line.split('"text": "')[1].split('"')[0]
            for line in hub_val_file(c, 0.2, str(mirror)).read_text(encoding="utf-8").splitlines()}
    section = EmbeddingInitSection(method="distill", distill={"languages": {"vi": 1.0}})
    [(rows, share)] = distill_corpus(section, [c], Path("unused"), str(mirror), val_fraction=0.2)
    texts = {r["text"] for r in rows}
    assert share == 1.0 and held and texts and not held & texts
