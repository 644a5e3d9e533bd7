"""Data preparation: cleaning, dedup, split, shards, reuse, tokenizer checks, bad input, CLI, task."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.data_fixtures import mixture_dataset, sample_corpora, tiny_tokenizer, write_jsonl
from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.data import (
    CleaningSpec,
    MixtureSampler,
    PrepareSettings,
    SourceSpec,
    check_tokenizer,
    load_dataset_meta,
    prepare_dataset,
    split_of,
    tokenizer_digest,
)
from vinasmol_core.data.clean import clean_document, dedup_hash, normalize_text
from vinasmol_core.data.shards import SourceTokens

VI_DOC = "Hà Nội là thủ đô của nước Cộng hòa xã hội chủ nghĩa Việt Nam, một thành phố có lịch sử lâu đời."
EN_DOC = "The old captain described the ancient bridge with great patience before the winter came."


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer(tmp_path_factory)


def _docs(dataset: Path, source: str, split: str = "train") -> list[list[int]]:
    """Every document of a source's split, as token lists without the trailing eos."""
    meta = load_dataset_meta(dataset)
    entry = next(s for s in meta["sources"] if s["name"] == source)
    stream = SourceTokens(dataset, entry["splits"][split]["shards"])
    offs = stream.doc_offsets()
    toks = stream.read(0, stream.n_tokens) if stream.n_tokens else np.zeros(0, np.int64)
    return [toks[a : b - 1].tolist() for a, b in zip(offs[:-1], offs[1:], strict=True)]


def test_package_names_resolve_lazily() -> None:
    """vinasmol_core.data imports its modules on first use: every exported name has its module."""
    import vinasmol_core.data as data

    assert sorted(data.__all__) == sorted(data._MODULE_OF)
    assert all(getattr(data, name) is not None for name in data.__all__)


# ----------------------------------------------------------------------------- cleaning
def test_normalisation_and_filters() -> None:
    spec = CleaningSpec(min_chars=10)
    decomposed = "Vie\u0302\u0323t Nam\r\nla\u0300 mo\u0323\u0302t\x00 nu\u031b\u01a1\u0301c\x07"
    text = normalize_text(decomposed)
    assert text == "Việt Nam\nlà một nước" and "\r" not in text
    assert clean_document("   \n\t ", "en", spec) == (None, "empty")
    assert clean_document("short", "en", spec) == (None, "too_short")
    spammy = "\n".join(["buy now and save"] * 8 + ["a real sentence here"])
    assert clean_document(spammy, "en", spec) == (None, "repeated_lines")
    assert clean_document(spammy, "code", spec)[1] is None  # code keeps its repeated lines
    assert clean_document(EN_DOC, "vi", spec) == (None, "script")  # English text tagged vi
    chinese = "北京是中华人民共和国的首都，也是一座历史悠久的城市。"
    assert clean_document(chinese, "vi", spec) == (None, "script")
    assert clean_document(VI_DOC, "vi", spec) == (VI_DOC, None)
    assert clean_document(EN_DOC, "en", spec) == (EN_DOC, None)


_SPACEY = list(" \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u1680\u2003\u2028\u202f\u3000") + list("aé\u1ec7中🙂\u200b")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(_SPACEY), max_size=30))
@example("")
@example("  a \u3000 b\n\n")
def test_dedup_hash_is_of_the_text_with_whitespace_runs_collapsed(text: str) -> None:
    assert dedup_hash(text) == xxhash.xxh3_64_intdigest(" ".join(text.split()).encode("utf-32-le"))


def test_no_whitespace_above_u3000() -> None:
    """dedup_hash's table of str.split()'s whitespace stops at U+3000."""
    assert not any(chr(c).isspace() for c in range(0x3001, 0x110000))


# ----------------------------------------------------------------------------- build
def test_shards_round_trip_and_counts(tmp_path_factory: pytest.TempPathFactory, tok: Path) -> None:
    ds = mixture_dataset(tmp_path_factory)
    meta = load_dataset_meta(ds)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 0
    assert meta["tokenizer_digest"] == tokenizer_digest(tok)
    for shard in meta["shards"]:
        arr = np.load(ds / shard, allow_pickle=False)
        assert arr.dtype == np.uint16 and arr.ndim == 1
        offs = np.load(ds / shard.replace(".npy", ".docs.npy"), allow_pickle=False)
        assert offs[0] == 0 and offs[-1] == arr.size
        assert np.all(arr[offs[1:] - 1] == 0)  # every document ends with <|endoftext|>
    counts = meta["token_counts"]
    total_by_source = sum(s["stats"]["train_tokens"] for s in meta["sources"])
    assert counts["total"] == total_by_source == counts["main"] + counts["annealing"]
    assert counts["vi"] + counts["en"] + counts["code"] == counts["total"]
    assert counts["val/vi"] > 0 and counts["val/en"] > 0
    # documents decode back to the source text
    tokenizer = Tokenizer.from_file(str(tok / "tokenizer.json"))
    lines = sample_corpora(tmp_path_factory)["en"].read_text().splitlines()
    texts = {json.loads(line)["text"] for line in lines}
    decoded = [tokenizer.decode(d) for d in _docs(ds, "sample-en")]
    assert decoded and all(d in texts for d in decoded)


def test_exact_dedup_across_sources(tmp_path: Path, tok: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl",
                    [{"id": f"a{i}", "text": f"{EN_DOC} Number {i} of many."} for i in range(6)])
    # b repeats a's documents 1 and 3 (with different spacing: normalised text is what is hashed)
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"id": "b0", "text": f"{EN_DOC}  Number 1 of many.\n"},
        {"id": "b1", "text": "A different document that only b has, long enough."},
        {"id": "b2", "text": f"{EN_DOC} Number 3 of   many."},
        {"id": "b3", "text": "A different document that only b has, long enough."},  # and one within b
    ])
    info = prepare_dataset([SourceSpec(name="a", lang="en", paths=(str(a),)),
                            SourceSpec(name="b", lang="en", paths=(str(b),))],
                           tok, tmp_path / "ds", PrepareSettings(val_fraction=0.0, workers=0))
    assert info.sources["a"].exact_duplicates == 0 and info.sources["a"].train_docs == 6
    assert info.sources["b"].exact_duplicates == 3 and info.sources["b"].train_docs == 1
    off = prepare_dataset([SourceSpec(name="a", lang="en", paths=(str(a),)),
                           SourceSpec(name="b", lang="en", paths=(str(b),))],
                          tok, tmp_path / "ds-nodedup",
                          PrepareSettings(val_fraction=0.0, dedup=False, workers=0))
    assert off.sources["b"].train_docs == 4


def test_near_dedup(tmp_path: Path, tok: Path) -> None:
    base = " ".join(f"word{i} {EN_DOC}" for i in range(30))
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": base}])
    other = " ".join(f"{EN_DOC} other{i}" for i in range(30))
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "text": base.replace("word7 ", "word seven ")},
                                           {"id": "z", "text": other}])
    srcs = [SourceSpec(name="a", lang="en", paths=(str(a),)),
            SourceSpec(name="b", lang="en", paths=(str(b),))]
    on = prepare_dataset(srcs, tok, tmp_path / "on",
                         PrepareSettings(val_fraction=0.0, near_dedup=True, workers=0))
    assert on.sources["b"].near_duplicates == 1 and on.sources["b"].train_docs == 1
    off = prepare_dataset(srcs, tok, tmp_path / "off", PrepareSettings(val_fraction=0.0, workers=0))
    assert off.sources["b"].train_docs == 2


def test_split_is_stable_and_per_document(tmp_path: Path, tok: Path) -> None:
    records = [{"id": f"doc-{i}", "text": f"{EN_DOC} Variant {i}."} for i in range(400)]
    splits = [split_of("src", r["id"], 0.2) for r in records]
    assert splits == [split_of("src", r["id"], 0.2) for r in records]
    assert 0.12 < splits.count("val") / len(splits) < 0.28
    full = write_jsonl(tmp_path / "full.jsonl", records)
    part = write_jsonl(tmp_path / "part.jsonl", records[::3][::-1])  # a subset, in another order
    kw = PrepareSettings(val_fraction=0.2, workers=0)
    prepare_dataset([SourceSpec(name="src", lang="en", paths=(str(full),))], tok, tmp_path / "f", kw)
    prepare_dataset([SourceSpec(name="src", lang="en", paths=(str(part),))], tok, tmp_path / "p", kw)
    tokenizer = Tokenizer.from_file(str(tok / "tokenizer.json"))

    def val_texts(ds: Path) -> set[str]:
        return {tokenizer.decode(d) for d in _docs(ds, "src", "val")}

    expected_val = {r["text"] for r, s in zip(records, splits, strict=True) if s == "val"}
    assert val_texts(tmp_path / "f") == expected_val
    assert val_texts(tmp_path / "p") == {r["text"] for r in records[::3]} & expected_val


def test_unchanged_inputs_reuse_the_artifact(tmp_path: Path, tok: Path) -> None:
    files = sample_corpora_small(tmp_path)
    srcs = [SourceSpec(name="s-en", lang="en", paths=(str(files),))]
    first = prepare_dataset(srcs, tok, tmp_path / "ds", PrepareSettings(workers=0))
    stamp = (tmp_path / "ds" / "dataset.json").stat().st_mtime_ns
    again = prepare_dataset(srcs, tok, tmp_path / "ds", PrepareSettings(workers=0))
    assert again.reused and again.key == first.key and not first.reused
    assert (tmp_path / "ds" / "dataset.json").stat().st_mtime_ns == stamp
    moved = tmp_path / "moved" / "en.jsonl"  # the same content elsewhere: the same key
    moved.parent.mkdir()
    moved.write_bytes(files.read_bytes())
    assert prepare_dataset([SourceSpec(name="s-en", lang="en", paths=(str(moved),))], tok, tmp_path / "ds",
                           PrepareSettings(workers=0)).reused
    # other settings or changed content: another key, rebuilt in place
    other = prepare_dataset(srcs, tok, tmp_path / "ds", PrepareSettings(val_fraction=0.5, workers=0))
    assert not other.reused and other.key != first.key
    with files.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "new", "text": EN_DOC}) + "\n")
    changed = prepare_dataset(srcs, tok, tmp_path / "ds", PrepareSettings(val_fraction=0.5, workers=0))
    assert not changed.reused and changed.key != other.key
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def sample_corpora_small(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "en.jsonl", [{"id": str(i), "text": f"{EN_DOC} ({i})"} for i in range(30)])


def test_store_publish_and_reuse_from_store(tmp_path: Path, tok: Path) -> None:
    from vinasmol_core.common.manifests import DatasetManifest
    from vinasmol_core.store import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
    srcs = [SourceSpec(name="s-en", lang="en", paths=(str(sample_corpora_small(tmp_path)),))]
    info = prepare_dataset(srcs, tok, tmp_path / "ds", PrepareSettings(workers=0), store=store,
                           ref="datasets/main")
    manifest = store.get_manifest("datasets/main")
    assert isinstance(manifest, DatasetManifest) and manifest.digest == info.manifest_digest
    assert manifest.tokenizer_digest == tokenizer_digest(tok) and manifest.token_counts["en"] > 0
    assert "dataset.json" in manifest.files and all(s in manifest.files for s in manifest.shards)
    elsewhere = prepare_dataset(srcs, tok, tmp_path / "other", PrepareSettings(workers=0), store=store)
    assert elsewhere.reused and elsewhere.manifest_digest == info.manifest_digest
    assert not (tmp_path / "other").exists()
    fetched = store.fetch(info.manifest_digest)
    MixtureSampler(fetched, {"en": 1.0}, 8).sequence(0)


def test_a_stored_build_missing_a_blob_or_forced_is_built_and_published_again(tmp_path: Path,
                                                                              tok: Path) -> None:
    from vinasmol_core.store import ArtifactStore

    url = f"file://{tmp_path / 'store'}"
    srcs = [SourceSpec(name="s-en", lang="en", paths=(str(sample_corpora_small(tmp_path)),))]
    info = prepare_dataset(srcs, tok, tmp_path / "ds", PrepareSettings(workers=0), store=url,
                           ref="datasets/main")
    store = ArtifactStore(url, cache_dir=tmp_path / "cache")
    shard = next(e for p, e in sorted(store.get_manifest(info.manifest_digest).files.items())
                 if p.endswith(".npy"))
    blob = next((tmp_path / "store").rglob(shard.sha256))
    blob.chmod(0o644)
    blob.write_bytes(b"\xff" + blob.read_bytes()[1:])
    assert store.verify(repair=True).removed == [shard.sha256]  # what `store verify --repair` does
    assert store.missing_files(info.manifest_digest)
    again = prepare_dataset(srcs, tok, tmp_path / "again", PrepareSettings(workers=0), store=url,
                            ref="datasets/main")
    assert not again.reused and again.manifest_digest == info.manifest_digest
    assert ArtifactStore(url).verify().problems == [] and not store.missing_files("datasets/main")
    ArtifactStore(url, cache_dir=tmp_path / "cache2").fetch("datasets/main")
    reused = prepare_dataset(srcs, tok, tmp_path / "reused", PrepareSettings(workers=0), store=url)
    assert reused.reused  # complete again: reused by key
    forced = prepare_dataset(srcs, tok, tmp_path / "forced", PrepareSettings(workers=0), store=url,
                             rebuild=True)
    assert not forced.reused and (tmp_path / "forced" / "dataset.json").is_file()


def test_the_data_step_rebuilds_only_when_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.data
    from tasks.common import forced_run

    assert forced_run() is False  # outside a Prefect task run
    seen: list[bool] = []

    def fake_prepare(*args: object, rebuild: bool = False, **kwargs: object) -> None:
        seen.append(rebuild)
        raise RuntimeError("stop")

    monkeypatch.setattr(tasks.data, "prepare_dataset", fake_prepare)
    store = type("Store", (), {"fetch": lambda self, artifact: tmp_path})()
    monkeypatch.setattr(tasks.data, "open_store", lambda url: store)
    from vinasmol_core.plan.recipe import DataSection

    for forced in (False, True):
        monkeypatch.setattr(tasks.data, "forced_run", lambda f=forced: f)
        with pytest.raises(RuntimeError, match="stop"):
            tasks.data.prepare_data.fn(role="main", corpora=[], corpus_digests={}, section=DataSection(),
                                       tokenizer_sha="t", tokenizer_artifact="x", store_url="memory://x")
    assert seen == [False, True]


def test_worker_pool_matches_in_process(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                        tok: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = sample_corpora(tmp_path_factory)
    code = [json.loads(line) for line in files["code"].read_text().splitlines()[:4]]
    srcs = [SourceSpec(name="s-vi", lang="vi", paths=(str(files["vi"]),)),
            SourceSpec(name="s-en", lang="en", paths=(str(files["en"]),)),
            SourceSpec(name="s-code", lang="code", paths=(str(write_jsonl(tmp_path / "code.jsonl", code)),))]
    plain = prepare_dataset(srcs, tok, tmp_path / "plain",
                            PrepareSettings(workers=0, use_fast_path=False, batch_chars=20_000))
    pooled = prepare_dataset(srcs, tok, tmp_path / "pool", PrepareSettings(workers=2, batch_chars=20_000))
    assert pooled.token_counts == plain.token_counts
    assert "disagreed" not in caplog.text  # the samples the workers sent back matched: no rebuild
    for src in ("s-vi", "s-en", "s-code"):
        for split in ("train", "val"):
            assert _docs(tmp_path / "pool", src, split) == _docs(tmp_path / "plain", src, split)


def test_other_formats_and_globs(tmp_path: Path, tok: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"f{i}.txt").write_text(f"{EN_DOC} File {i}.\n", encoding="utf-8")
    pq.write_table(pa.table({"content": [f"{EN_DOC} Row {i}." for i in range(4)], "id": list("abcd")}),
                   tmp_path / "t.parquet")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"id": i, "text": f"{EN_DOC} Gz {i}."}) + "\n")
    info = prepare_dataset([
        SourceSpec(name="txt", lang="en", paths=(str(tmp_path / "txt" / "*.txt"),)),
        SourceSpec(name="pq", lang="en", paths=(str(tmp_path / "t.parquet"),), text_field="content"),
        SourceSpec(name="gz", lang="en", paths=(str(tmp_path / "g.jsonl.gz"),)),
    ], tok, tmp_path / "ds", PrepareSettings(val_fraction=0.0, workers=0))
    assert {n: s.train_docs for n, s in info.sources.items()} == {"txt": 3, "pq": 4, "gz": 5}


def test_fsspec_url_source(tmp_path: Path, tok: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/vinasmol-data-test/en.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": i, "text": f"{EN_DOC} Remote {i}."}) + "\n")
    info = prepare_dataset([SourceSpec(name="remote", lang="en", paths=("memory://vinasmol-data-test/*.jsonl",))],
                           tok, tmp_path / "ds", PrepareSettings(val_fraction=0.0, workers=0))
    assert info.sources["remote"].train_docs == 4


def test_datasets_source_streams(tmp_path: Path, tok: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls: list[tuple] = []

    def load_dataset(name: str, config: str | None, **kw: object) -> list[dict]:
        calls.append((name, config, kw))
        return [{"id": f"h{i}", "text": f"{EN_DOC} Hub {i}."} for i in range(5)]

    # the real `datasets` takes tens of seconds to import; its call is what matters here
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = SourceSpec.parse_cli("wiki:vi=hf:wikimedia/wikipedia:20231101.vi@train")
    assert (spec.hf_dataset, spec.hf_config, spec.hf_split, spec.lang) == ("wikimedia/wikipedia",
                                                                           "20231101.vi", "train", "vi")
    spec = SourceSpec(name="hub", lang="en", hf_dataset="org/corpus", hf_config="en", hf_revision="abc")
    info = prepare_dataset([spec], tok, tmp_path / "ds", PrepareSettings(val_fraction=0.0, workers=0))
    assert info.sources["hub"].train_docs == 5
    assert calls == [("org/corpus", "en", {"split": "train", "streaming": True, "revision": "abc"})]


# ----------------------------------------------------------------------------- tokenizer check
def test_dataset_refused_by_a_model_with_another_tokenizer(tmp_path_factory: pytest.TempPathFactory,
                                                           tok: Path) -> None:
    ds = mixture_dataset(tmp_path_factory)
    other = tiny_tokenizer(tmp_path_factory, vocab_size=700)
    check_tokenizer(ds, tok)  # the same tokenizer passes
    with pytest.raises(VinaSmolError, match="tokenized with tokenizer sha256 .* but .* has tokenizer sha256"):
        check_tokenizer(ds, other)
    with pytest.raises(VinaSmolError, match="tokenizer"):
        MixtureSampler(ds, {"vi": 1.0}, 16, tokenizer_dir=other)


# ----------------------------------------------------------------------------- bad input
def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path: Path, tok: Path) -> None:
    good = json.dumps({"id": "1", "text": EN_DOC}).encode()
    path = tmp_path / "bad.jsonl"
    latin1 = b'{"id": "2", "text": "caf\xe9 au lait is nice to drink"}'
    path.write_bytes(good + b"\n" + latin1 + b"\n" + good + b"\n")
    out = tmp_path / "ds"
    src = [SourceSpec(name="bad", lang="en", paths=(str(path),))]
    with pytest.raises(VinaSmolError, match=r"bad\.jsonl line 2 is not valid UTF-8"):
        prepare_dataset(src, tok, out, PrepareSettings(workers=0))
    _assert_nothing_written(tmp_path, out)
    path.write_bytes(good + b"\n{not json\n" + b"[1, 2]\n")
    with pytest.raises(VinaSmolError, match=r"bad\.jsonl line 2 is not valid JSON"):
        prepare_dataset(src, tok, out, PrepareSettings(workers=0))
    _assert_nothing_written(tmp_path, out)
    info = prepare_dataset(src, tok, out, PrepareSettings(skip_bad_lines=True, val_fraction=0.0, workers=0))
    assert info.sources["bad"].bad_lines_skipped == 2 and info.sources["bad"].train_docs == 1


@pytest.mark.timeout(120)
def test_worker_processes_report_errors_and_stop(tmp_path: Path, tok: Path) -> None:
    """With worker processes: a bad line is named as in-process, and a tokenizer that fails after the
    workers started (they wait for their config) ends the build without hanging."""
    out = tmp_path / "ds"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": f"{EN_DOC} {i}"}).encode() + b"\n" for i in range(50))
                     + b"{not json\n")
    with pytest.raises(VinaSmolError, match=r"bad\.jsonl line 51 is not valid JSON"):
        prepare_dataset([SourceSpec(name="bad", lang="en", paths=(str(path),))], tok, out,
                        PrepareSettings(workers=2))
    _assert_nothing_written(tmp_path, out)
    data = (tok / "tokenizer.json").read_text(encoding="utf-8").replace("<|endoftext|>", "<|end|>")
    (tmp_path / "no-eos").mkdir()
    (tmp_path / "no-eos" / "tokenizer.json").write_text(data, encoding="utf-8")
    with pytest.raises(VinaSmolError, match=r"has no <\|endoftext\|> token"):
        prepare_dataset([SourceSpec(name="s-en", lang="en", paths=(str(sample_corpora_small(tmp_path)),))],
                        tmp_path / "no-eos", out, PrepareSettings(workers=2))
    _assert_nothing_written(tmp_path, out)


@pytest.mark.timeout(120)
def test_a_worker_dead_before_its_config_fails_the_build_without_hanging(tmp_path: Path, tok: Path) -> None:
    import os
    import signal

    from vinasmol_core.data.worker import Batch, WorkerConfig, WorkerPool

    cfg = WorkerConfig(tokenizer_path=str(tok / "tokenizer.json"), eos_id=0, dtype="uint16",
                       cleaning=CleaningSpec(), val_fraction=0.0, dedup=False, near_dedup=False)
    batch = Batch(source="s", lang="en", text_field="text", id_field=None, skip_bad_lines=False,
                  ids=["1"], texts=[EN_DOC])
    with pytest.raises(VinaSmolError, match="a data worker process died"), WorkerPool(2) as workers:
        assert workers.pool is not None
        os.kill(next(iter(workers.pool._processes)), signal.SIGKILL)  # before it reads its config
        workers.configure(cfg)
        list(workers.results(iter([batch, batch, batch])))
    assert workers.config_file is not None and not workers.config_file.exists()


def test_truncated_or_corrupt_gzip_is_an_error_naming_the_file(tmp_path: Path, tok: Path) -> None:
    data = gzip.compress(b"".join(json.dumps({"text": f"{EN_DOC} {i}"}).encode() + b"\n" for i in range(200)))
    corrupt = bytearray(data)
    corrupt[40:60] = b"\xff" * 20
    out = tmp_path / "ds"
    for name, content in (("cut.jsonl.gz", data[: len(data) // 2]), ("bad.jsonl.gz", bytes(corrupt)),
                          ("plain.jsonl.gz", b'{"text": "not compressed"}\n')):
        (tmp_path / name).write_bytes(content)
        src = [SourceSpec(name="g", lang="en", paths=(str(tmp_path / name),))]
        with pytest.raises(VinaSmolError, match=rf"source 'g': cannot read .*{name}: "):
            prepare_dataset(src, tok, out, PrepareSettings(workers=0))
        _assert_nothing_written(tmp_path, out)


def test_empty_source_and_missing_field_are_errors(tmp_path: Path, tok: Path) -> None:
    from vinasmol_core.store import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
    ok = sample_corpora_small(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    out = tmp_path / "ds"
    with pytest.raises(VinaSmolError, match="source 'nothing' is empty"):
        prepare_dataset([SourceSpec(name="ok", lang="en", paths=(str(ok),)),
                         SourceSpec(name="nothing", lang="en", paths=(str(empty),))], tok, out,
                        PrepareSettings(workers=0), store=store)
    _assert_nothing_written(tmp_path, out)
    assert store.list_refs() == {} and store.list_manifests() == []
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"id": "1", "body": EN_DOC}])
    with pytest.raises(VinaSmolError, match=r"wrong\.jsonl line 1 has no field 'text' \(fields: body, id\)"):
        prepare_dataset([SourceSpec(name="w", lang="en", paths=(str(wrong),))], tok, out,
                        PrepareSettings(workers=0), store=store)
    _assert_nothing_written(tmp_path, out)
    with pytest.raises(VinaSmolError, match="does not exist"):
        prepare_dataset([SourceSpec(name="m", lang="en", paths=(str(tmp_path / "missing.jsonl"),))], tok, out)
    with pytest.raises(VinaSmolError, match="matches no file"):
        prepare_dataset([SourceSpec(name="m", lang="en", paths=(str(tmp_path / "nope-*.jsonl"),))], tok, out)
    _assert_nothing_written(tmp_path, out)
    assert store.list_refs() == {}


def test_bad_weights_are_config_errors(tmp_path_factory: pytest.TempPathFactory) -> None:
    ds = mixture_dataset(tmp_path_factory)
    with pytest.raises(ConfigError, match="weight for 'en' is negative"):
        MixtureSampler(ds, {"vi": 0.6, "en": -0.1}, 16)
    with pytest.raises(ConfigError, match="sum to zero"):
        MixtureSampler(ds, {"vi": 0.0, "en": 0.0}, 16)
    with pytest.raises(ConfigError, match="'klingon' is neither"):
        MixtureSampler(ds, {"klingon": 1.0}, 16)
    with pytest.raises(ConfigError, match="matches no source"):
        MixtureSampler(ds, {"any": 1.0}, 16)


# ----------------------------------------------------------------------------- CLI and task
def test_cli_prepare_inspect_and_errors(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                        tok: Path) -> None:
    from typer.testing import CliRunner

    from vinasmol_core.cli import app

    files = sample_corpora(tmp_path_factory)
    runner = CliRunner()
    out = tmp_path / "ds"
    args = ["data", "prepare", "--source", f"v:vi={files['vi']}", "--source", f"e:en={files['en']}",
            "--tokenizer", str(tok), "--out", str(out), "--val-fraction", "0.1", "--workers", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "built in" in result.output and "v: 60 docs read" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "reused" in result.output
    result = runner.invoke(app, ["data", "inspect", str(out), "--json"])
    summary = json.loads(result.output)
    assert summary["sources"]["v"]["lang"] == "vi" and summary["token_counts"]["vi"] > 0
    assert runner.invoke(app, ["data", "inspect", str(out)]).exit_code == 0
    result = runner.invoke(app, ["data", "sample", str(out), "--weights", "vi=1,en=1", "--seq-len", "8",
                                 "--tokenizer", str(tok)])
    assert result.exit_code == 0 and "[0] " in result.output
    bad = runner.invoke(app, ["data", "prepare", "--source", "x:fr=whatever", "--tokenizer", str(tok),
                              "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, ConfigError) and "language 'fr'" in str(bad.exception)


def test_data_step_builds_then_reuses(tmp_path: Path, tok: Path) -> None:
    from tasks.data import prepare_data
    from vinasmol_core.common.manifests import TokenizerManifest
    from vinasmol_core.plan.recipe import CorpusSpec, DataSection
    from vinasmol_core.store import ArtifactStore

    url = (tmp_path / "store").as_uri()
    carrier = ArtifactStore(url).publish(TokenizerManifest(vocab_size=1, base_vocab_size=1), tok)
    files = {"kind": "files", "train": [str(sample_corpora_small(tmp_path))]}
    corpus = CorpusSpec(name="s-en", lang="en", source=files)
    section = DataSection(curation={"enabled": False})  # one-line documents: Gopher would drop them all
    args = {"role": "main", "corpora": [corpus], "corpus_digests": {}, "section": section,
            "tokenizer_sha": "t", "tokenizer_artifact": carrier.digest, "store_url": url}
    manifest = prepare_data.fn(**args)
    assert manifest.token_counts["en"] > 0
    assert prepare_data.fn(**args).digest == manifest.digest
    assert ArtifactStore(url).resolve("datasets/main") == manifest.digest


def test_progress_is_reported_while_a_source_is_read(tmp_path: Path, tok: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import vinasmol_core.data.prepare as prepare

    monkeypatch.setattr(prepare, "PROGRESS_SECONDS", 0.0)
    rows = [{"id": str(i), "text": f"{EN_DOC} Number {i}."} for i in range(60)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    seen: list[tuple[str, int, int]] = []
    info = prepare_dataset([SourceSpec(name="a", lang="en", paths=(str(src),))], tok, tmp_path / "ds",
                           PrepareSettings(val_fraction=0.0, workers=0, batch_chars=2000),
                           on_progress=lambda name, s: seen.append((name, s.docs_read, s.bytes_read)))
    assert len(seen) > 3 and {name for name, _, _ in seen} == {"a"}
    docs = [d for _, d, _ in seen]
    assert docs == sorted(docs) and docs[0] < docs[-1] <= info.sources["a"].docs_read


@pytest.mark.slow  # imports `datasets`
def test_a_token_budget_counts_the_kept_tokens(tmp_path: Path, tok: Path) -> None:
    """Half the documents are duplicates: reading the budget's bytes would give about half the tokens;
    the data step reads on until the kept training tokens meet the budget, and records both."""
    from tasks.common import hub_source_spec
    from vinasmol_core.plan.hub_mirror import write_dataset_config
    from vinasmol_core.plan.recipe import CorpusSpec

    docs = [f"Bài viết số {i // 2} về lịch sử và văn hóa Việt Nam, với nhiều câu dài hơn."
            for i in range(600)]
    write_dataset_config(tmp_path / "mirror" / "org" / "web", "vi", {
        "train": ({"id": f"d-{i}", "text": t} for i, t in enumerate(docs))})
    corpus = CorpusSpec(name="web", lang="vi", source={"kind": "hub", "dataset": "org/web", "config": "vi",
                                                       "budget": {"tokens": 3000, "bytes_per_token": 1.0}})
    spec = hub_source_spec(corpus, str(tmp_path / "mirror"))
    assert (spec.max_tokens, spec.max_bytes) == (3000, 3000)
    stats = prepare_dataset([spec], tok, tmp_path / "ds",
                            PrepareSettings(val_fraction=0.0, workers=0)).sources["web"]
    per_doc = stats.train_tokens / stats.train_docs
    assert stats.planned_tokens == 3000
    assert 3000 <= stats.train_tokens < 3000 + 2 * per_doc  # the budget met, by the document that meets it
    assert stats.exact_duplicates > 0 and stats.bytes_read > 3000
