"""sha256 of local files and the stat signatures that tell whether a file changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vinasmol_core.common.manifests import FileEntry

CHUNK = 8 << 20  # read/hash granularity


def hash_file(path: Path, chunk: int = CHUNK) -> FileEntry:
    """sha256 and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
    return FileEntry(sha256=h.hexdigest(), size=size)


def _stat_sig(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _file_sig(path: Path) -> tuple[int, int, int, int]:
    """Size, mtime, ctime and inode: any write or chmod changes it (ctime cannot be set back)."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
