"""What publishing a folder does before the manifest is written: list its files, hash them, and upload
the blobs the store lacks while later files are still being hashed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from vinasmol_core.common.errors import StoreError
from vinasmol_core.common.manifests import FileEntry
from vinasmol_core.store.backends.base import UploadJob, _Backend, _Counters
from vinasmol_core.store.hashing import CHUNK, _stat_sig, hash_file
from vinasmol_core.store.layout import _blob_key, _check_path


def scan_folder(src_dir: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every file under `src_dir`, sorted; StoreError for anything else."""
    if not src_dir.is_dir():
        raise StoreError(f"cannot publish {src_dir}: not a folder")
    files: list[tuple[str, Path]] = []
    for dirpath, dirs, names in os.walk(src_dir):
        dirs.sort()
        for name in sorted(names):
            full = Path(dirpath) / name
            if not full.is_file():
                raise StoreError(f"cannot publish {full}: not a regular file")
            rel = full.relative_to(src_dir).as_posix()
            files.append((_check_path(rel, f"cannot publish {src_dir}"), full))
    return files


def missing_blobs(backend: _Backend, files: dict[str, FileEntry]) -> set[str]:
    """The paths of `files` whose blob the store lacks (or holds with another size)."""
    keys = {_blob_key(e.sha256): e for e in files.values()}
    infos = backend.stat_many(sorted(keys))
    bad_shas = {e.sha256 for k, e in keys.items() if infos.get(k) is None or infos[k].size != e.size}
    return {p for p, e in files.items() if e.sha256 in bad_shas}


def hash_and_upload(
    backend: _Backend, counters: _Counters, files: list[tuple[str, Path]], label: str
) -> dict[str, FileEntry]:
    """Hash files in parallel; as each is hashed, upload its blob if the store lacks it."""
    entries: dict[str, FileEntry] = {}
    seen: set[str] = set()
    hashers = min(4, max(1, os.cpu_count() or 1), max(1, len(files)))

    def hashed(item: tuple[str, Path]) -> tuple[str, Path, FileEntry, tuple[int, int, int]]:
        rel, full = item
        sig = _stat_sig(full)
        entry = hash_file(full, CHUNK)
        if _stat_sig(full) != sig:
            raise StoreError(f"{label}: file {rel} changed while it was being hashed")
        return rel, full, entry, sig

    def jobs(pool: ThreadPoolExecutor) -> Iterator[UploadJob]:
        futures = [pool.submit(hashed, item) for item in files]
        try:
            for fut in as_completed(futures):
                rel, full, entry, sig = fut.result()
                entries[rel] = entry
                if entry.sha256 in seen:
                    continue
                seen.add(entry.sha256)
                info = backend.stat(_blob_key(entry.sha256))
                if info is not None and info.size == entry.size:
                    continue
                yield UploadJob(_blob_key(entry.sha256), full, entry.size, sig, f"{label}: file {rel}")
        finally:
            for fut in futures:
                fut.cancel()

    with ThreadPoolExecutor(hashers) as pool:
        backend.upload(jobs(pool), counters)
    return entries
