"""The local cache of fetched artifacts: `<cache>/<digest>/` folders, with a copy of each manifest and the
stat signature of every file as of its last sha256 check under `<cache>/.manifests/`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from vinasmol_core.common.manifests import Manifest, manifest_from_json
from vinasmol_core.store.hashing import _file_sig, hash_file


def _manifest_copy_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / ".manifests" / f"{digest}.json"


def _marks_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / ".manifests" / f"{digest}.verified"


def remember_manifest(cache_dir: Path, digest: str, m: Manifest) -> None:
    path = _manifest_copy_path(cache_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(m.canonical_json())
    os.replace(tmp, path)


def cached_manifest(cache_dir: Path, digest: str) -> Manifest | None:
    """The copy of manifest `digest` a fetch left in the cache (None if absent or damaged)."""
    path = _manifest_copy_path(cache_dir, digest)
    try:
        m = manifest_from_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None
    return m if m.digest == digest else None


def write_marks(cache_dir: Path, digest: str, marks: dict[str, tuple[int, ...]]) -> None:
    """Remember each cached file's stat signature as of its last sha256 check."""
    path = _marks_path(cache_dir, digest)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({p: list(sig) for p, sig in marks.items()}))
    os.replace(tmp, path)


def cache_valid(cache_dir: Path, folder: Path, digest: str, m: Manifest) -> bool:
    """Whether every file of the cached copy still has its manifest's bytes. A file whose stat
    signature (size, mtime, ctime, inode) changed since its last check is hashed again."""
    try:
        marks = json.loads(_marks_path(cache_dir, digest).read_text())
    except (OSError, ValueError):
        marks = {}
    if not isinstance(marks, dict):
        marks = {}
    changed = False
    for path, entry in m.files.items():
        file = folder / path
        try:
            sig = _file_sig(file)
            if sig[0] != entry.size:
                return False
            if marks.get(path) == list(sig):
                continue
            if hash_file(file).sha256 != entry.sha256:
                return False
            os.chmod(file, 0o444)
            marks[path], changed = list(_file_sig(file)), True
        except OSError:
            return False
    if changed:
        with contextlib.suppress(OSError):
            write_marks(cache_dir, digest, {p: tuple(marks[p]) for p in m.files})
    return True


def discard(cache_dir: Path, folder: Path) -> None:
    """Remove a cached folder: renamed aside first, so that no reader sees it half deleted."""
    trash = cache_dir / f".tmp-trash-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_cache_tmp(cache_dir: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove what fetches that crashed left behind (`.tmp-*` older than `max_age_s`)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(cache_dir):
            if entry.name.startswith(".tmp-") and now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry.path, ignore_errors=True)
