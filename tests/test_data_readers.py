"""Reading a source: paths and globs resolved to files with their format, content digests, and the
records of JSONL, Parquet and text files (plain and compressed) cut into batches, with errors that
name the source and the file."""

from __future__ import annotations

import bz2
import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.data.readers import ReadCounters, ResolvedFile, iter_batches, resolve_files, source_digest
from vinasmol_core.data.spec import SourceSpec
from vinasmol_core.data.worker import Batch


def _spec(*paths: str | Path, **kw: object) -> SourceSpec:
    return SourceSpec(name="src", lang="vi", paths=tuple(str(p) for p in paths), **kw)


def _jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def _batches(spec: SourceSpec, counters: ReadCounters | None = None, *, skip_bad_lines: bool = False,
             batch_chars: int = 1 << 21) -> list[Batch]:
    files = resolve_files(spec) if not spec.hf_dataset else []
    return list(iter_batches(spec, files, skip_bad_lines=skip_bad_lines, counters=counters or ReadCounters(),
                             batch_chars=batch_chars))


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder on fsspec's in-memory filesystem (a remote source without a server)."""
    import fsspec

    root = f"memory:///readers-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ----------------------------------------------------------------------------- resolving files
def test_globs_and_folders_resolve_to_sorted_unique_files_with_their_format(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.json.gz", "c.PARQUET", "d.txt", "e.ndjson.zst", "sub/f.md", "sub/g.jsonl.bz2"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files = resolve_files(_spec(tmp_path / "*.jsonl", tmp_path, f"file://{tmp_path}/b.jsonl"))
    by_name = {Path(f.url).relative_to(tmp_path).as_posix(): f for f in files}
    assert list(by_name) == ["b.jsonl", "a.json.gz", "c.PARQUET", "d.txt", "e.ndjson.zst", "sub/f.md",
                             "sub/g.jsonl.bz2"]  # the glob's match first, then the folder sorted, no repeats
    assert {n: (f.fmt, f.compression) for n, f in by_name.items()} == {
        "b.jsonl": ("jsonl", None),
        "a.json.gz": ("jsonl", "gzip"),
        "c.PARQUET": ("parquet", None),
        "d.txt": ("text", None),
        "e.ndjson.zst": ("jsonl", "zstd"),
        "sub/f.md": ("text", None),
        "sub/g.jsonl.bz2": ("jsonl", "bz2"),
    }
    assert all(f.local for f in files)
    forced = resolve_files(_spec(tmp_path / "a.json.gz", format="text"))
    assert forced == [ResolvedFile(str(tmp_path / "a.json.gz"), True, "text", "gzip")]


def test_missing_paths_are_refused_naming_source_and_entry(tmp_path: Path, memory_root: str) -> None:
    with pytest.raises(VinaSmolError, match=f"source 'src': file {tmp_path}/nope.jsonl does not exist"):
        resolve_files(_spec(tmp_path / "nope.jsonl"))
    with pytest.raises(VinaSmolError, match=rf"source 'src': {tmp_path}/\*.parquet matches no file"):
        resolve_files(_spec(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VinaSmolError, match=f"source 'src': {tmp_path}/empty matches no file"):
        resolve_files(_spec(tmp_path / "empty"))
    with pytest.raises(VinaSmolError, match=f"source 'src': {memory_root}/x.jsonl matches no file"):
        resolve_files(_spec(f"{memory_root}/x.jsonl"))


def test_remote_urls_resolve_and_read_through_fsspec(memory_root: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    records = [{"id": f"r{i}", "text": f"văn bản {i}"} for i in range(3)]
    with fs.open(f"{memory_root}/part-1.jsonl.gz", "wb") as f:
        f.write(gzip.compress(_jsonl(records)))
    with fs.open(f"{memory_root}/part-0.txt", "wb") as f:
        f.write("một tài liệu".encode())
    files = resolve_files(_spec(f"{memory_root}/part-*"))
    assert [(f.url, f.local, f.fmt, f.compression) for f in files] == [
        (f"{memory_root}/part-0.txt", False, "text", None),
        (f"{memory_root}/part-1.jsonl.gz", False, "jsonl", "gzip"),
    ]
    batches = list(iter_batches(_spec(f"{memory_root}/part-*"), files, skip_bad_lines=False,
                                counters=ReadCounters()))
    assert [(b.ids, b.texts) for b in batches[:1]] == [([f"{memory_root}/part-0.txt"], ["một tài liệu"])]
    assert [json.loads(line) for line in batches[1].lines] == records


# ----------------------------------------------------------------------------- digests
def test_digest_follows_content_and_names(tmp_path: Path, memory_root: str) -> None:
    (tmp_path / "a.jsonl").write_bytes(_jsonl([{"text": "x"}]))
    (tmp_path / "b.jsonl").write_bytes(_jsonl([{"text": "y"}]))
    spec = _spec(tmp_path / "*.jsonl")

    def digest() -> str:
        return source_digest(spec, resolve_files(spec))

    first = digest()
    assert len(first) == 64 and first == digest()
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (other / name).write_bytes((tmp_path / name).read_bytes())
    assert source_digest(_spec(other), resolve_files(_spec(other))) == first  # where it lives does not count
    (tmp_path / "b.jsonl").write_bytes(_jsonl([{"text": "z"}]))
    changed = digest()
    assert changed != first
    (tmp_path / "b.jsonl").rename(tmp_path / "c.jsonl")
    assert digest() not in (first, changed)  # a renamed file is another source

    import fsspec

    fs = fsspec.filesystem("memory")
    remote = _spec(f"{memory_root}/r.jsonl")
    fs.pipe(f"{memory_root}/r.jsonl", b'{"text": "x"}\n')
    before = source_digest(remote, resolve_files(remote))
    fs.pipe(f"{memory_root}/r.jsonl", b'{"text": "w"}\n')
    assert source_digest(remote, resolve_files(remote)) != before


def test_dataset_digest_is_its_identity_and_local_data_files(tmp_path: Path) -> None:
    def digest(**kw: Any) -> str:
        spec = SourceSpec(name="hub", lang="vi", hf_dataset="org/corpus", **kw)
        return source_digest(spec, [])

    pinned = digest(hf_revision="abc123")
    assert pinned == digest(hf_revision="abc123")
    assert len({pinned, digest(hf_revision="def456"), digest(), digest(hf_split="validation"),
                digest(hf_config="vi", hf_revision="abc123")}) == 5
    data = tmp_path / "data.jsonl"
    data.write_bytes(_jsonl([{"text": "x"}]))
    with_file = digest(hf_data_files=(str(data),))
    data.write_bytes(_jsonl([{"text": "y"}]))
    assert digest(hf_data_files=(str(data),)) != with_file


# ----------------------------------------------------------------------------- JSONL
def test_jsonl_lines_travel_raw_with_line_numbers_in_batches(tmp_path: Path) -> None:
    records = [{"id": str(i), "text": "chữ " * (i + 1)} for i in range(12)]
    raw = _jsonl(records[:5]) + b"\n   \n" + _jsonl(records[5:])
    (tmp_path / "a.jsonl").write_bytes(raw)
    batches = _batches(_spec(tmp_path / "a.jsonl"), batch_chars=100)
    assert len(batches) > 2
    assert all(b.chars >= 100 for b in batches[:-1]) and 0 < batches[-1].chars
    assert all((b.source, b.lang, b.where, b.base_name) == ("src", "vi", str(tmp_path / "a.jsonl"), "a.jsonl")
               for b in batches)
    lines = [line for b in batches for line in b.lines]
    assert [json.loads(line) for line in lines] == records
    assert [n for b in batches for n in b.line_numbers] == [1, 2, 3, 4, 5, *range(8, 15)]  # blanks skipped
    assert sum(b.chars for b in batches) == sum(len(line) for line in lines)
    assert all(not b.ids and not b.texts for b in batches)


@pytest.mark.parametrize("suffix", [".gz", ".bz2"])
def test_compressed_jsonl_reads_like_plain(tmp_path: Path, suffix: str) -> None:
    records = [{"id": str(i), "text": f"dòng {i}"} for i in range(5)]
    compress = gzip.compress if suffix == ".gz" else bz2.compress
    (tmp_path / f"a.jsonl{suffix}").write_bytes(compress(_jsonl(records)))
    [batch] = _batches(_spec(tmp_path / f"a.jsonl{suffix}"))
    assert [json.loads(line) for line in batch.lines] == records and batch.base_name == f"a.jsonl{suffix}"


def test_truncated_gzip_is_refused_naming_the_file(tmp_path: Path) -> None:
    blob = gzip.compress(_jsonl([{"text": "x" * 50, "id": str(i)} for i in range(200)]))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VinaSmolError, match=f"source 'src': cannot read {bad}"):
        _batches(_spec(bad))


# ----------------------------------------------------------------------------- Parquet
def test_parquet_records_with_ids_and_row_fallbacks(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"doc": ["a", None, "c"] * 400, "content": [f"bài {i}" for i in range(1200)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=500)
    batches = _batches(_spec(tmp_path / "p.parquet", text_field="content", id_field="doc"))
    ids = [i for b in batches for i in b.ids]
    texts = [t for b in batches for t in b.texts]
    assert texts == [f"bài {i}" for i in range(1200)]
    assert ids[:4] == ["a", "p.parquet:2", "c", "a"] and ids[-2] == "p.parquet:1199"  # rows count from 1
    assert all(not b.lines for b in batches)
    no_ids = _batches(_spec(tmp_path / "p.parquet", text_field="content", id_field="missing"))
    assert [i for b in no_ids for i in b.ids][:2] == ["p.parquet:1", "p.parquet:2"]


def test_parquet_without_a_string_text_column_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"], "id": ["1"]}), tmp_path / "a.parquet")
    with pytest.raises(VinaSmolError, match=r"'src': .*a.parquet has no column 'text' \(columns: body, id\)"):
        _batches(_spec(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(VinaSmolError, match=r"b.parquet column 'text' is not a string column"):
        _batches(_spec(tmp_path / "b.parquet"))


# ----------------------------------------------------------------------------- text files
def test_text_files_are_one_document_each_without_bom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufeffXin chào\nthế giới\n".encode())
    (tmp_path / "b.py").write_text("print('x')\n")
    batches = _batches(_spec(tmp_path), batch_chars=5)
    assert [(b.ids, b.texts, b.where) for b in batches] == [
        (["a.txt"], ["Xin chào\nthế giới\n"], str(tmp_path / "a.txt")),
        (["b.py"], ["print('x')\n"], str(tmp_path / "b.py")),
    ]


def test_undecodable_text_is_refused_or_counted_when_skipping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two\nthree \xff\xfe here\n")
    (tmp_path / "good.txt").write_text("fine")
    with pytest.raises(VinaSmolError, match=rf"source 'src': {bad} line 3 is not valid UTF-8 \(byte 24\)"):
        _batches(_spec(tmp_path))
    counters = ReadCounters()
    batches = _batches(_spec(tmp_path), counters, skip_bad_lines=True)
    assert [b.ids for b in batches] == [["good.txt"]]
    assert (counters.bad_lines_skipped, counters.bad_line_examples) == (1, [f"{bad}:3"])


# ----------------------------------------------------------------------------- `datasets` sources
@pytest.mark.slow  # imports `datasets` (several seconds)
def test_dataset_records_stream_by_field_and_a_missing_field_is_named(tmp_path: Path) -> None:
    """A `datasets` source read through the local `json` builder: records in order, ids from the id
    field or `<dataset>:<row>`; a record without the text field is refused naming row and fields."""
    data = tmp_path / "d.jsonl"
    rows = [{"id": "x", "body": "một"}, {"id": None, "body": "hai"}, {"id": "z", "body": None}]
    data.write_bytes(_jsonl(rows))

    def hub(files: Path, **kw: Any) -> SourceSpec:
        return SourceSpec(name="hub", lang="vi", hf_dataset="json", hf_data_files=(str(files),), **kw)

    [batch] = _batches(hub(data, text_field="body"))
    assert (batch.ids, batch.texts, batch.source) == (["x", "json:2", "z"], ["một", "hai", None], "hub")
    with pytest.raises(VinaSmolError, match=r"'hub': json row 1 has no field 'text' \(fields: body, id\)"):
        _batches(hub(data))
    with pytest.raises(VinaSmolError, match="source 'hub': cannot open dataset 'json'"):
        _batches(hub(tmp_path / "no.jsonl"))
