"""The interface every backend implements, the transfer jobs it runs and the counters it feeds."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vinasmol_core.common.errors import StoreError


@dataclass(frozen=True)
class ObjInfo:
    """One object of the store: key relative to the root, size in bytes, modification time (epoch s)."""

    key: str
    size: int
    mtime: float


@dataclass
class UploadJob:
    key: str
    path: Path
    size: int
    sig: tuple[int, int, int]
    label: str


@dataclass
class DownloadJob:
    key: str
    dest: Path
    size: int
    sha256: str
    label: str  # "artifact <name> (<digest>): file <path>"


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
        self.blobs_uploaded = 0
        self.blobs_downloaded = 0

    def up(self, n: int) -> None:
        with self._lock:
            self.bytes_uploaded += n
            self.blobs_uploaded += 1

    def down(self, n: int) -> None:
        with self._lock:
            self.bytes_downloaded += n
            self.blobs_downloaded += 1


def _short(job: DownloadJob) -> str:
    return f"{job.label}: store blob {job.sha256} is shorter than the manifest's {job.size} bytes"


REPUBLISH_HINT = "re-run the step that made this artifact with --force to publish it again"


def _mismatch(job: DownloadJob, got: str) -> StoreError:
    return StoreError(
        f"{job.label}: sha256 mismatch (expected {job.sha256}, store blob hashes to {got}): "
        "the blob in the store is corrupt; `vinasmol store verify --repair` removes it, then "
        + REPUBLISH_HINT
    )


class _Backend:
    """Object access under one root. Keys are relative, '/'-separated."""

    url: str

    def ensure_ready(self, write: bool = False) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def stat(self, key: str) -> ObjInfo | None:  # pragma: no cover - interface
        raise NotImplementedError

    def stat_many(self, keys: list[str]) -> dict[str, ObjInfo | None]:
        return {k: self.stat(k) for k in keys}

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        return {k: self.read(k) for k in keys}

    def list(self, prefix: str) -> list[ObjInfo]:  # pragma: no cover - interface
        raise NotImplementedError

    def delete(self, key: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def move(self, src: str, dst: str) -> bool:  # pragma: no cover - interface
        """Rename an object (replacing `dst`); False when `src` does not exist."""
        raise NotImplementedError

    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:  # pragma: no cover
        raise NotImplementedError

    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:  # pragma: no cover
        raise NotImplementedError

    def hash_objects(self, keys: list[str]) -> dict[str, str | Exception]:  # pragma: no cover
        raise NotImplementedError

    def cleanup_stale(self, older_than: float, dry_run: bool) -> int:
        return 0

    def close(self) -> None:
        pass
