"""Backends with a file-like API: a local folder (file://) and fsspec's memory filesystem (memory://)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import StoreError
from vinasmol_core.store.backends.base import (
    REPUBLISH_HINT,
    DownloadJob,
    ObjInfo,
    UploadJob,
    _Backend,
    _Counters,
    _mismatch,
)
from vinasmol_core.store.hashing import CHUNK, _stat_sig


class _ThreadedBackend(_Backend):
    """Shared streaming transfer code for backends with a file-like API (file://, memory://)."""

    max_workers: int

    def _open_read(self, key: str):  # noqa: ANN202
        raise NotImplementedError

    def _put_stream(self, key: str, path: Path, job: UploadJob) -> None:
        raise NotImplementedError

    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:
        def one(job: UploadJob) -> None:
            self._put_stream(job.key, job.path, job)
            counters.up(job.size)

        with ThreadPoolExecutor(self.max_workers) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            for fut in as_completed(futures):
                fut.result()

    def _copy_verified(self, job: DownloadJob, counters: _Counters) -> None:
        h = hashlib.sha256()
        size = 0
        try:
            src = self._open_read(job.key)
        except FileNotFoundError:
            raise StoreError(
                f"{job.label}: blob {job.sha256} is missing from store {self.url}; {REPUBLISH_HINT}"
            ) from None
        with src, open(job.dest, "wb") as out:
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                h.update(data)
                out.write(data)
                size += len(data)
        counters.down(size)
        if size != job.size:
            raise StoreError(
                f"{job.label}: store blob {job.sha256} has {size} bytes, manifest says {job.size}"
            )
        got = h.hexdigest()
        if got != job.sha256:
            raise _mismatch(job, got)

    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:
        with ThreadPoolExecutor(self.max_workers) as pool:
            for fut in as_completed([pool.submit(self._copy_verified, j, counters) for j in jobs]):
                fut.result()

    def hash_objects(self, keys: list[str]) -> dict[str, str | Exception]:
        def one(key: str) -> str | Exception:
            try:
                h = hashlib.sha256()
                with self._open_read(key) as fh:
                    while data := fh.read(CHUNK):
                        h.update(data)
                return h.hexdigest()
            except Exception as exc:  # reported per blob
                return exc

        with ThreadPoolExecutor(self.max_workers) as pool:
            return dict(zip(keys, pool.map(one, keys), strict=True))


class _LocalBackend(_ThreadedBackend):
    """A folder on local disk; every write goes to tmp/ first and is renamed into place."""

    def __init__(self, root: Path, max_workers: int) -> None:
        self.root = root
        self.url = root.as_uri()
        self.max_workers = max_workers

    def _path(self, key: str) -> Path:
        return self.root / key

    def ensure_ready(self, write: bool = False) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.url} is not a folder")
        if write:
            try:
                (self.root / "tmp").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create store folder {self.url}: {exc.strerror}") from None

    def check(self) -> None:
        self.ensure_ready(write=True)
        probe = self.root / "tmp" / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            os.listdir(self.root)
        except OSError as exc:
            raise StoreError(f"store {self.url} is not writable: {exc.strerror}") from None

    def _tmp(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}.part"

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {key} in store {self.url}: {exc.strerror}") from None

    def write(self, key: str, data: bytes) -> None:
        self.ensure_ready(write=True)
        dest = self._path(key)
        tmp = self._tmp()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {key} in store {self.url}: {exc.strerror}") from None

    def stat(self, key: str) -> ObjInfo | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> list[ObjInfo]:
        base = self._path(prefix)
        out: list[ObjInfo] = []
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                out.append(ObjInfo(full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return out

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def move(self, src: str, dst: str) -> bool:
        dest = self._path(dst)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self._path(src), dest)
        except FileNotFoundError:
            return False
        return True

    def _open_read(self, key: str):  # noqa: ANN202
        return open(self._path(key), "rb")

    def _put_stream(self, key: str, path: Path, job: UploadJob) -> None:
        dest = self._path(key)
        tmp = self._tmp()
        try:
            shutil.copyfile(path, tmp)  # sendfile/copy_file_range: streamed by the kernel
            if _stat_sig(path) != job.sig:
                raise StoreError(f"{job.label}: the file changed while it was being published")
            os.chmod(tmp, 0o444)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except OSError as exc:
            raise StoreError(f"cannot store {job.label} in {self.url}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def cleanup_stale(self, older_than: float, dry_run: bool) -> int:
        n = 0
        for obj in self.list("tmp"):
            if obj.mtime < older_than:
                n += 1
                if not dry_run:
                    self.delete(obj.key)
        return n


class _MemoryBackend(_ThreadedBackend):
    """fsspec's in-process memory filesystem (tests)."""

    def __init__(self, root: str, max_workers: int) -> None:
        import fsspec

        self.fs = fsspec.filesystem("memory")
        self.root = "/" + root.strip("/") if root.strip("/") else ""
        self.url = "memory://" + self.root
        self.max_workers = max_workers

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def ensure_ready(self, write: bool = False) -> None:
        pass

    def check(self) -> None:
        pass

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def stat(self, key: str) -> ObjInfo | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        return ObjInfo(key, int(info["size"]), _mtime_of(info))

    def list(self, prefix: str) -> list[ObjInfo]:
        base = self._path(prefix)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        head = self.root + "/"
        return [
            ObjInfo(p[len(head) :], int(i["size"]), _mtime_of(i))
            for p, i in found.items()
            if i.get("type") == "file" and p.startswith(head)
        ]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def move(self, src: str, dst: str) -> bool:
        try:
            self.fs.mv(self._path(src), self._path(dst))
        except FileNotFoundError:
            return False
        return True

    def _open_read(self, key: str):  # noqa: ANN202
        return self.fs.open(self._path(key), "rb")

    def _put_stream(self, key: str, path: Path, job: UploadJob) -> None:
        tmp = self._path(f"tmp/{uuid.uuid4().hex}.part")
        with open(path, "rb") as src, self.fs.open(tmp, "wb") as out:
            while data := src.read(CHUNK):
                out.write(data)
        if _stat_sig(path) != job.sig:
            self.fs.rm_file(tmp)
            raise StoreError(f"{job.label}: the file changed while it was being published")
        self.fs.mv(tmp, self._path(key))


def _mtime_of(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "created"):
        v = info.get(k)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, int | float):
            return float(v)
    return time.time()
