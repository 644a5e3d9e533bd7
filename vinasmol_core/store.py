"""Content-addressed artifact store over a URL: `file://` (the default), `s3://` (any S3-compatible
server) or `memory://` (tests).

Layout under the root URL:
    blobs/<sha[:2]>/<sha256>          immutable file contents, named by their sha256
    manifests/<digest>.json           canonical JSON of a Manifest; digest = Manifest.digest
    refs/<name>.json                  {"digest": ...}: the current target of a named pointer
    ref-history/<name>/<ns>-<digest>  one empty marker per move of the ref (ns: nanoseconds since epoch)
    tmp/                              staging for file:// writes (renamed into place)
    trash/<sha256>                    blobs `gc` set aside: put back if a manifest names them, else deleted

Invariants: a blob is written completely (rename, or S3's atomic object creation) before any manifest
names it; a manifest is written before any ref points at it. A crash at any point therefore leaves no
manifest that names a missing blob, only unreferenced blobs that `gc` removes after a grace period.
`gc` moves a doomed blob to trash/ first and reads the manifests again before deleting it; a publish
checks its blobs after writing its manifest. So a publish that reuses an old unreferenced blob while
`gc` runs either has its manifest seen by `gc` (which puts the blob back) or sees the blob gone (and
uploads it again).

Fetching materializes a manifest into `<cache>/<digest>/`, verifying every file's sha256; the cache is
$VINASMOL_CACHE or ~/.cache/vinasmol/artifacts (or the `cache_dir` argument). Fetched files are
read-only: copy before modifying. A cache hit hashes again any file whose size, mtime, ctime or inode
changed since it was last verified, and fetches the artifact again when one no longer matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError

from vinasmol_core.errors import StoreError
from vinasmol_core.manifests import FileEntry, Manifest, check_relative_path, manifest_from_json

M = TypeVar("M", bound=Manifest)

CHUNK = 8 << 20  # read/hash granularity
PART_SIZE = 8 << 20  # default S3 multipart part size (also the ranged-GET size on fetch)
SUPPORTED_SCHEMES = ("file", "s3", "memory")
TRASH = "trash/"  # where gc sets doomed blobs aside before deleting them
DATA_PATHS = ("auto", "obstore", "aiobotocore")  # S3 blob transfers; auto: obstore when there is an endpoint

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")
_REF_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]*$")
_HISTORY_ENTRY = re.compile(r"^(\d{20})-([0-9a-f]{64}|deleted)$")


# ---------------------------------------------------------------------------------------------- helpers
def default_store_url() -> str:
    """$VINASMOL_STORE, else file:// under the user's data folder (~/.local/share/vinasmol/store)."""
    env = os.environ.get("VINASMOL_STORE", "").strip()
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base) / "vinasmol" / "store").resolve().as_uri()


def default_cache_dir() -> Path:
    """$VINASMOL_CACHE, else ~/.cache/vinasmol/artifacts (honours XDG_CACHE_HOME)."""
    env = os.environ.get("VINASMOL_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vinasmol" / "artifacts"


def validate_ref(name: str) -> str:
    """A ref is `segment(/segment)*` of letters, digits and `._+=@-`; no `..`, no leading `/`."""
    if not isinstance(name, str) or not name:
        raise StoreError("ref name is empty")
    if name.startswith("/") or name.endswith("/") or "//" in name or "\\" in name:
        raise StoreError(f"invalid ref name {name!r}: use segments like runs/<run>/<step>, no leading '/'")
    for seg in name.split("/"):
        if seg in (".", "..") or not _REF_SEGMENT.match(seg) or len(seg) > 200:
            raise StoreError(
                f"invalid ref name {name!r}: segment {seg!r} must be letters, digits or ._+=@- "
                "(not '.' or '..', not starting with '.' or '-')"
            )
    return name


def _check_path(path: str, what: str) -> str:
    try:
        return check_relative_path(path)
    except ValueError as exc:
        raise StoreError(f"{what}: {exc}") from None


def _blob_key(sha: str) -> str:
    return f"blobs/{sha[:2]}/{sha}"


def _manifest_key(digest: str) -> str:
    return f"manifests/{digest}.json"


def _ref_key(name: str) -> str:
    return f"refs/{name}.json"


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


@dataclass(frozen=True)
class RefMove:
    """One move of a ref: when, and to which manifest (None: the ref was deleted)."""

    ref: str
    digest: str | None
    time: datetime


@dataclass
class VerifyReport:
    manifests: int = 0
    blobs: int = 0
    bytes_hashed: int = 0
    refs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    blobs_total: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    blobs_kept_recent: int = 0
    stale_uploads_removed: int = 0
    dry_run: bool = False


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


def _mismatch(job: DownloadJob, got: str) -> StoreError:
    return StoreError(
        f"{job.label}: sha256 mismatch (expected {job.sha256}, store blob hashes to {got}): "
        "the blob in the store is corrupt"
    )


# ---------------------------------------------------------------------------------------------- backends
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
            raise StoreError(f"{job.label}: blob {job.sha256} is missing from store {self.url}") from None
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


def _pwrite_all(fd: int, chunks: list[bytes], offset: int) -> None:
    """Write chunks back to back at `offset` (vectored, no joining copy)."""
    for i in range(0, len(chunks), 512):  # stay under IOV_MAX
        batch = [memoryview(c) for c in chunks[i : i + 512]]
        while batch:
            n = os.pwritev(fd, batch, offset)
            offset += n
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch.pop(0)
            if batch and n:
                batch[0] = batch[0][n:]


def _update_all(h: Any, chunks: list[bytes]) -> None:
    for c in chunks:
        h.update(c)


def _is_connect_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, aiohttp.ClientConnectionError)


def _mtime_of(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "created"):
        v = info.get(k)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, int | float):
            return float(v)
    return time.time()


class _S3Backend(_Backend):
    """An S3 bucket (and key prefix) through aiobotocore, with parallel multipart transfers."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        key: str | None,
        secret: str | None,
        max_workers: int,
        token: str | None = None,
        data_path: str = "auto",
        part_size: int = PART_SIZE,
    ) -> None:
        # Region: s3fs/aiobotocore take it from the environment (client_kwargs region breaks some setups).
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        import s3fs

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._secrets = [s for s in (key, secret) if s]
        self.concurrency = max(1, max_workers)
        if part_size < 5 << 20:
            raise StoreError(f"S3 part size {part_size} is below the 5 MiB that S3 requires")
        self.part_size = part_size
        self.multipart_threshold = 2 * part_size  # files at least this big are uploaded in parts
        config: dict[str, Any] = {
            # The body is covered by a CRC32 checksum; signing it too would hash every byte twice more.
            "s3": {"payload_signing_enabled": False},
            "request_checksum_calculation": "when_supported",
            "response_checksum_validation": "when_required",  # fetch verifies sha256 itself
            "max_pool_connections": max(10, 2 * self.concurrency + 4),
            "retries": {"max_attempts": 4, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 120,
        }
        if endpoint_url:
            config["s3"]["addressing_style"] = "path"
        self.fs = s3fs.S3FileSystem(
            key=key,
            secret=secret,
            token=token,
            endpoint_url=endpoint_url,
            # Stores with the same endpoint and credentials share one client (and its connection pool):
            # creating one costs about a second of CPU. The instance cache resets itself after fork.
            use_listings_cache=False,
            config_kwargs=config,
        )
        self._ready = False
        self._creds = (key, secret, token) if key and secret else None
        if data_path not in DATA_PATHS:
            raise StoreError(f"unknown S3 data path {data_path!r}: use one of {', '.join(DATA_PATHS)}")
        self._obs_args = (endpoint_url, key, secret, token)
        self._obs: _ObstoreData | None = None
        self._use_obstore = data_path == "obstore" or (data_path == "auto" and bool(endpoint_url))

    def __repr__(self) -> str:
        return f"_S3Backend({self.url!r}, endpoint_url={self.endpoint_url!r})"

    # -- plumbing
    @property
    def where(self) -> str:
        return f"{self.url}" + (f" (endpoint {_redact_url(self.endpoint_url)})" if self.endpoint_url else "")

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    async def _client(self):  # noqa: ANN202
        return await self.fs.set_session()

    def _error(self, exc: BaseException, what: str) -> StoreError:
        """A StoreError naming the store (never the credentials) for a failed S3 call."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and what == "head_bucket"):
                return StoreError(f"bucket {self.bucket!r} does not exist (store {self.where})")
            if code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403",
                "Forbidden",
            ) or (status == 403):
                return StoreError(
                    f"access denied to store {self.where} ({code or status}): check the S3 credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the store's key/secret options)"
                )
            msg = self._scrub(str(err.get("Message", "")))
            return StoreError(f"S3 {what} failed on store {self.where}: {code or status} {msg}".rstrip())
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError(
                f"no S3 credentials for store {self.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, EndpointConnectionError | ConnectionError | TimeoutError) or _is_connect_error(
            exc
        ):
            return StoreError(
                f"cannot reach S3 endpoint {self.endpoint_url or 'AWS'} for store {self.url}: "
                f"{type(exc).__name__}"
            )
        if isinstance(exc, OSError) and exc.strerror:
            where = f" ({exc.filename})" if exc.filename else ""
            return StoreError(f"{what} for store {self.url} failed: {exc.strerror}{where}")
        return StoreError(
            f"S3 {what} failed on store {self.where}: {type(exc).__name__}: {self._scrub(str(exc))}"
        )

    def _run(self, coro_fn: Callable[[], Any], what: str) -> Any:
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, coro_fn)
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc, what) from None

    @staticmethod
    def _code(exc: BaseException) -> str:
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            return str(resp.get("Error", {}).get("Code", ""))
        return ""

    def _is_missing(self, exc: BaseException) -> bool:
        return self._code(exc) in ("404", "NoSuchKey", "NotFound")

    # -- readiness
    def ensure_ready(self, write: bool = False) -> None:
        if self._ready:
            return
        self._probe_endpoint()

        async def go() -> Any:
            s3 = await self._client()
            await s3.head_bucket(Bucket=self.bucket)
            if self._use_obstore and self._creds is None:  # profile, role...: ask the session
                creds = await self.fs.session.get_credentials()
                return None if creds is None else await creds.get_frozen_credentials()
            return None

        frozen = self._run(go, "head_bucket")
        if self._use_obstore:
            endpoint, key, secret, token = self._obs_args
            if self._creds is None and frozen is not None:
                key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
            if key and secret:
                self._obs = _ObstoreData(self, endpoint, key, secret, token)
            # else: aiobotocore reports the missing credentials
        self._ready = True

    def _probe_endpoint(self) -> None:
        """Fail fast (no retry storm) when nothing listens at a custom endpoint."""
        if not self.endpoint_url:
            return
        parts = urlsplit(self.endpoint_url)
        if not parts.hostname:
            raise StoreError(f"S3 endpoint {self.endpoint_url!r} of store {self.url} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=10):
                pass
        except OSError as exc:
            raise StoreError(
                f"cannot reach S3 endpoint {self.endpoint_url} for store {self.url}: {exc.strerror or exc}"
            ) from None

    def check(self) -> None:
        self._ready = False
        self.ensure_ready()
        probe = self._k(f"tmp/.probe-{uuid.uuid4().hex}")

        async def go() -> None:
            s3 = await self._client()
            await s3.list_objects_v2(Bucket=self.bucket, Prefix=self._k(""), MaxKeys=1)
            await s3.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            await s3.delete_object(Bucket=self.bucket, Key=probe)

        self._run(go, "write probe")

    # -- small objects
    async def _aread(self, key: str) -> bytes | None:
        s3 = await self._client()
        try:
            resp = await s3.get_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise
        async with resp["Body"] as body:
            return await body.read()

    def read(self, key: str) -> bytes | None:
        self.ensure_ready()
        return self._run(lambda: self._aread(key), f"read {key}")

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        self.ensure_ready()

        async def go() -> list[bytes | None]:
            sem = asyncio.Semaphore(4 * self.concurrency)

            async def one(k: str) -> bytes | None:
                async with sem:
                    return await self._aread(k)

            return await asyncio.gather(*(one(k) for k in keys))

        return dict(zip(keys, self._run(go, "read"), strict=True))

    def write(self, key: str, data: bytes) -> None:
        self.ensure_ready()

        async def go() -> None:
            s3 = await self._client()
            await s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

        self._run(go, f"write {key}")

    async def _astat(self, key: str) -> ObjInfo | None:
        s3 = await self._client()
        try:
            r = await s3.head_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise
        return ObjInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp())

    def stat(self, key: str) -> ObjInfo | None:
        self.ensure_ready()
        return self._run(lambda: self._astat(key), f"stat {key}")

    def stat_many(self, keys: list[str]) -> dict[str, ObjInfo | None]:
        self.ensure_ready()

        async def go() -> list[ObjInfo | None]:
            sem = asyncio.Semaphore(4 * self.concurrency)

            async def one(k: str) -> ObjInfo | None:
                async with sem:
                    return await self._astat(k)

            return await asyncio.gather(*(one(k) for k in keys))

        return dict(zip(keys, self._run(go, "stat"), strict=True))

    def list(self, prefix: str) -> list[ObjInfo]:
        self.ensure_ready()

        async def go() -> list[ObjInfo]:
            s3 = await self._client()
            out: list[ObjInfo] = []
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k(prefix.rstrip("/") + "/")}
            while True:
                resp = await s3.list_objects_v2(**kwargs)
                for obj in resp.get("Contents", []):
                    out.append(
                        ObjInfo(self._rel(obj["Key"]), int(obj["Size"]), obj["LastModified"].timestamp())
                    )
                if not resp.get("IsTruncated"):
                    return out
                kwargs["ContinuationToken"] = resp["NextContinuationToken"]

        return self._run(go, f"list {prefix}")

    def delete(self, key: str) -> None:
        self.ensure_ready()

        async def go() -> None:
            s3 = await self._client()
            await s3.delete_object(Bucket=self.bucket, Key=self._k(key))

        self._run(go, f"delete {key}")

    def move(self, src: str, dst: str) -> bool:
        """Server-side copy (multipart above 5 GB), then delete the source."""
        self.ensure_ready()

        async def go() -> bool:
            try:
                await self.fs._cp_file(f"{self.bucket}/{self._k(src)}", f"{self.bucket}/{self._k(dst)}")
            except FileNotFoundError:
                return False
            s3 = await self._client()
            await s3.delete_object(Bucket=self.bucket, Key=self._k(src))
            return True

        return self._run(go, f"move {src}")

    # -- blobs
    async def _upload_one(self, job: UploadJob, counters: _Counters, sem: asyncio.Semaphore) -> None:
        s3 = await self._client()
        key = self._k(job.key)
        fd = os.open(job.path, os.O_RDONLY)
        try:
            if job.size < self.multipart_threshold:
                async with sem:
                    data = await asyncio.to_thread(os.pread, fd, job.size, 0)
                    if _stat_sig(job.path) != job.sig or len(data) != job.size:
                        raise StoreError(f"{job.label}: the file changed while it was being published")
                    await s3.put_object(Bucket=self.bucket, Key=key, Body=data)
                counters.up(job.size)
                return
            mpu = await s3.create_multipart_upload(Bucket=self.bucket, Key=key)
            upload_id = mpu["UploadId"]
            try:

                async def part(number: int, offset: int) -> dict[str, Any]:
                    async with sem:
                        length = min(self.part_size, job.size - offset)
                        data = await asyncio.to_thread(os.pread, fd, length, offset)
                        if len(data) != length:
                            raise StoreError(f"{job.label}: the file changed while it was being published")
                        r = await s3.upload_part(
                            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                        )
                    entry = {"PartNumber": number, "ETag": r["ETag"]}
                    for ck in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA256", "ChecksumCRC64NVME"):
                        if r.get(ck):
                            entry[ck] = r[ck]
                    return entry

                offsets = range(0, job.size, self.part_size)
                parts = await asyncio.gather(*(part(i + 1, off) for i, off in enumerate(offsets)))
                if _stat_sig(job.path) != job.sig:
                    raise StoreError(f"{job.label}: the file changed while it was being published")
                await s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                    )
                raise
            counters.up(job.size)
        finally:
            os.close(fd)

    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:
        """Start each job as soon as the iterator yields it (hashing of later files overlaps uploads)."""
        self.ensure_ready()
        if self._obs is not None:
            return self._obs.upload(jobs, counters)
        sem = asyncio.Semaphore(self.concurrency)  # binds to the loop on first use
        futures: list[Future[None]] = []
        try:
            for job in jobs:
                coro = self._upload_one(job, counters, sem)
                futures.append(asyncio.run_coroutine_threadsafe(coro, self.fs.loop))
        finally:
            errors: list[BaseException] = []
            for fut in futures:
                try:
                    fut.result()
                except BaseException as exc:
                    errors.append(exc)
            if errors:
                raise self._error(errors[0], "upload")

    async def _get_range(self, key: str, start: int, end: int, job: DownloadJob) -> list[bytes]:
        """The bytes [start, end) of an object as the chunks the socket delivered (no joining copy)."""
        s3 = await self._client()
        last: BaseException | None = None
        for attempt in range(4):
            try:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
                if end > start:
                    kwargs["Range"] = f"bytes={start}-{end - 1}"
                resp = await s3.get_object(**kwargs)
                async with resp["Body"] as body:
                    stream = getattr(getattr(body, "_raw_stream", None), "content", None)
                    if stream is None or not hasattr(stream, "readany"):  # another HTTP backend
                        return [await body.read()]
                    chunks = []
                    while chunk := await stream.readany():
                        chunks.append(chunk)
                    return chunks
            except Exception as exc:
                if self._is_missing(exc) or self._code(exc) == "NoSuchKey":
                    raise StoreError(
                        f"{job.label}: blob {job.sha256} is missing from store {self.url}"
                    ) from None
                if self._code(exc) == "InvalidRange":
                    raise StoreError(_short(job)) from None
                if isinstance(exc, StoreError) or self._code(exc) in ("AccessDenied", "InvalidAccessKeyId"):
                    raise
                last = exc
                await asyncio.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    async def _download_one(
        self, job: DownloadJob, counters: _Counters, sem: asyncio.Semaphore, window: asyncio.Semaphore
    ) -> None:
        key = self._k(job.key)
        h = hashlib.sha256()
        fd = os.open(job.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if job.size == 0:
                async with sem:
                    data = await self._get_range(key, 0, 0, job)
                if any(data):
                    raise StoreError(
                        f"{job.label}: store blob {job.sha256} is not empty as the manifest says"
                    )
            else:
                pending: dict[int, bytes] = {}
                state = {"next": 0}
                lock = asyncio.Lock()
                starts = list(range(0, job.size, self.part_size))

                async def part(index: int, start: int) -> None:
                    end = min(start + self.part_size, job.size)
                    # The window bounds parts downloaded but not yet hashed. Parts take it in order, so
                    # the part the hash waits for always holds one. (On error the call's semaphores die.)
                    await window.acquire()
                    async with sem:
                        data = await self._get_range(key, start, end, job)
                    if sum(len(c) for c in data) != end - start:
                        raise StoreError(_short(job))
                    await asyncio.to_thread(_pwrite_all, fd, data, start)
                    pending[index] = data
                    async with lock:  # hash parts in order, overlapped with other parts' transfers
                        while state["next"] in pending:
                            chunks = pending.pop(state["next"])
                            await asyncio.to_thread(_update_all, h, chunks)
                            state["next"] += 1
                            window.release()

                await asyncio.gather(*(part(i, s) for i, s in enumerate(starts)))
            counters.down(job.size)
        finally:
            os.close(fd)
        got = h.hexdigest()
        if got != job.sha256:
            raise _mismatch(job, got)

    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:
        self.ensure_ready()
        if self._obs is not None:
            return self._obs.download(jobs, counters)

        async def go() -> None:
            sem, window = asyncio.Semaphore(self.concurrency), asyncio.Semaphore(2 * self.concurrency)
            tasks = [asyncio.ensure_future(self._download_one(j, counters, sem, window)) for j in jobs]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        self._run(go, "download")

    def hash_objects(self, keys: list[str]) -> dict[str, str | Exception]:
        self.ensure_ready()

        sem = asyncio.Semaphore(self.concurrency)

        async def one(k: str) -> str | Exception:
            try:
                h = hashlib.sha256()
                s3 = await self._client()
                async with sem:
                    resp = await s3.get_object(Bucket=self.bucket, Key=self._k(k))
                    async with resp["Body"] as body:
                        while True:
                            data = await body.read(CHUNK)
                            if not data:
                                break
                            await asyncio.to_thread(h.update, data)
                return h.hexdigest()
            except Exception as exc:
                return exc

        async def go() -> list[str | Exception]:
            return await asyncio.gather(*(one(k) for k in keys))

        return dict(zip(keys, self._run(go, "verify"), strict=True))

    def cleanup_stale(self, older_than: float, dry_run: bool) -> int:
        """Abort multipart uploads (of crashed publishers) started before `older_than`."""
        self.ensure_ready()

        async def go() -> int:
            s3 = await self._client()
            n = 0
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k("blobs/")}
            while True:
                resp = await s3.list_multipart_uploads(**kwargs)
                for up in resp.get("Uploads", []):
                    initiated = up.get("Initiated")
                    if isinstance(initiated, datetime) and initiated.timestamp() < older_than:
                        n += 1
                        if not dry_run:
                            await s3.abort_multipart_upload(
                                Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                            )
                if not resp.get("IsTruncated"):
                    return n
                kwargs["KeyMarker"] = resp.get("NextKeyMarker")
                kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker")

        return self._run(go, "cleanup")


# ------------------------------------------------------------------------------------------ obstore data path
class _ObstoreData:
    """Blob bytes through obstore (Rust object_store): multipart puts, ranged gets hashed in order."""

    def __init__(
        self,
        backend: _S3Backend,
        endpoint_url: str | None,
        key: str | None,
        secret: str | None,
        token: str | None,
    ) -> None:
        from obstore.store import S3Store

        opts: dict[str, Any] = {"region": os.environ["AWS_DEFAULT_REGION"], "unsigned_payload": True}
        if endpoint_url:
            opts["endpoint"] = endpoint_url
            opts["virtual_hosted_style_request"] = False
        if key and secret:
            opts.update(access_key_id=key, secret_access_key=secret)
            if token:
                opts["token"] = token
        client = {"allow_http": bool(endpoint_url and endpoint_url.startswith("http://")), "timeout": "120s"}
        self.backend = backend
        self.store = S3Store(
            backend.bucket,
            prefix=backend.prefix or None,
            client_options=client,
            **opts,  # type: ignore[arg-type]
        )

    def _put(self, job: UploadJob, counters: _Counters) -> None:
        import obstore

        multipart = job.size >= self.backend.multipart_threshold
        conc = self.backend.concurrency
        obstore.put(
            self.store,
            job.key,
            job.path,
            use_multipart=multipart,
            chunk_size=self.backend.part_size,
            max_concurrency=conc,
        )
        if _stat_sig(job.path) != job.sig:
            obstore.delete(self.store, job.key)
            raise StoreError(f"{job.label}: the file changed while it was being published")
        counters.up(job.size)

    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(
            max(1, self.backend.concurrency // 2), thread_name_prefix="vinasmol-obs"
        ) as pool:
            try:
                for job in jobs:
                    futures.append(pool.submit(self._put, job, counters))
            finally:
                for fut in futures:
                    fut.result()

    def _get_part(
        self, job: DownloadJob, fd: int, progress: _HashProgress, index: int, bufs: threading.local
    ) -> None:
        import obstore

        start = index * self.backend.part_size
        length = min(self.backend.part_size, job.size - start)
        try:
            data = obstore.get_range(self.store, job.key, start=start, length=length)
        except FileNotFoundError:
            raise StoreError(
                f"{job.label}: blob {job.sha256} is missing from store {self.backend.url}"
            ) from None
        view = memoryview(data)
        if len(view) != length:
            raise StoreError(_short(job))
        written = 0
        while written < length:
            written += os.pwritev(fd, [view[written:]], start + written)
        buf = getattr(bufs, "buf", None)
        if buf is None:
            buf = bufs.buf = bytearray(self.backend.part_size)
        progress.part_done(index, view, buf)

    def _get_empty(self, job: DownloadJob) -> None:
        import obstore

        try:
            data = obstore.get(self.store, job.key).bytes()
        except FileNotFoundError:
            raise StoreError(
                f"{job.label}: blob {job.sha256} is missing from store {self.backend.url}"
            ) from None
        if len(data):
            raise StoreError(f"{job.label}: store blob {job.sha256} is not empty as the manifest says")

    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:
        bufs = threading.local()
        opened: list[tuple[DownloadJob, int, _HashProgress, list[Future[None]]]] = []
        with ThreadPoolExecutor(self.backend.concurrency, thread_name_prefix="vinasmol-obs") as pool:
            try:
                for job in jobs:
                    fd = os.open(job.dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    progress = _HashProgress(fd, job.size, self.backend.part_size)
                    if job.size == 0:
                        futs = [pool.submit(self._get_empty, job)]
                    else:
                        n = (job.size + self.backend.part_size - 1) // self.backend.part_size
                        futs = [pool.submit(self._get_part, job, fd, progress, i, bufs) for i in range(n)]
                    opened.append((job, fd, progress, futs))
                for job, _fd, progress, futs in opened:
                    for fut in futs:
                        fut.result()
                    got = progress.h.hexdigest()
                    if got != job.sha256:
                        raise _mismatch(job, got)
                    counters.down(job.size)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                for _job, fd, _progress, _futs in opened:
                    os.close(fd)


class _HashProgress:
    """Hashes a file being written part by part, in order, as soon as each prefix is complete."""

    def __init__(self, fd: int, size: int, part_size: int) -> None:
        self.fd = fd
        self.size = size
        self.part_size = part_size
        self.h = hashlib.sha256()
        self.next = 0
        self.done: set[int] = set()
        self.active = False
        self.lock = threading.Lock()

    def part_done(self, index: int, data: memoryview, buf: bytearray) -> None:
        """Part `index` is on disk (its bytes still in `data`, a view of `buf`); hash what is contiguous."""
        with self.lock:
            self.done.add(index)
            if self.active:
                return  # the thread hashing now will reach this part
            self.active = True
        own_valid = True
        while True:
            with self.lock:
                if self.next not in self.done:
                    self.active = False
                    return
                idx = self.next
            if idx == index and own_valid:
                self.h.update(data)
            else:  # another thread's part: read it back (from the page cache)
                start = idx * self.part_size
                length = min(self.part_size, self.size - start)
                view = memoryview(buf)[:length]
                got = os.preadv(self.fd, [view], start)
                if got != length:
                    raise StoreError(f"local file shrank while hashing part {idx}")
                self.h.update(view)
                own_valid = False
            with self.lock:
                self.done.discard(idx)
                self.next += 1


# ---------------------------------------------------------------------------------------------- the store
def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return parts._replace(netloc=host).geturl()
    return url


class ArtifactStore:
    """Typed, content-addressed artifacts with named refs. Thread-safe for concurrent calls."""

    def __init__(
        self,
        url: str | None = None,
        *,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        cache_dir: Path | None = None,
        max_workers: int = 8,
        data_path: str = "auto",
        part_size: int = PART_SIZE,
    ) -> None:
        """`url` defaults to $VINASMOL_STORE, else file:// under the user's data folder.
        S3 credentials default to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL.
        S3 blobs move in `part_size` parts through obstore where there is an endpoint URL (`data_path`
        "auto"; "obstore" or "aiobotocore" to choose)."""
        raw = (url or "").strip() or default_store_url()
        if "://" not in raw:  # a plain path
            raw = Path(raw).expanduser().resolve().as_uri()
        scheme = raw.split("://", 1)[0].lower()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.max_workers = max(1, int(max_workers))
        self._counters = _Counters()
        self._manifest_cache: dict[str, Manifest] = {}
        self._lock = threading.Lock()
        if scheme == "file":
            path = raw[len("file://") :]
            if not path:
                raise StoreError(f"store URL {raw!r} names no folder")
            self._backend: _Backend = _LocalBackend(Path(path).expanduser().resolve(), self.max_workers)
        elif scheme in ("s3", "s3a"):
            parts = urlsplit(raw)
            if parts.username or parts.password or "@" in parts.netloc:
                raise StoreError(
                    f"store URL {_redact_url(raw)!r} must not carry credentials: use AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY or the key/secret options"
                )
            bucket = parts.netloc
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket or ""):
                raise StoreError(f"store URL {raw!r}: {bucket!r} is not a valid S3 bucket name")
            endpoint = (
                endpoint_url
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
                or None
            )
            self._backend = _S3Backend(
                bucket,
                parts.path,
                endpoint,
                key if key is not None else os.environ.get("AWS_ACCESS_KEY_ID"),
                secret if secret is not None else os.environ.get("AWS_SECRET_ACCESS_KEY"),
                self.max_workers,
                token=os.environ.get("AWS_SESSION_TOKEN") if key is None else None,
                data_path=data_path,
                part_size=part_size,
            )
        elif scheme == "memory":
            self._backend = _MemoryBackend(raw[len("memory://") :], self.max_workers)
        else:
            raise StoreError(
                f"unknown store URL scheme {scheme!r} in {_redact_url(raw)!r}: use "
                + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
            )
        self.url: str = self._backend.url

    # -- counters
    @property
    def bytes_uploaded(self) -> int:
        """Blob bytes this store object has uploaded (manifests and refs not counted)."""
        return self._counters.bytes_uploaded

    @property
    def bytes_downloaded(self) -> int:
        """Blob bytes this store object has downloaded (fetch)."""
        return self._counters.bytes_downloaded

    @property
    def blobs_uploaded(self) -> int:
        return self._counters.blobs_uploaded

    @property
    def blobs_downloaded(self) -> int:
        return self._counters.blobs_downloaded

    def __repr__(self) -> str:
        endpoint = getattr(self._backend, "endpoint_url", None)
        return f"ArtifactStore({self.url!r}" + (f", endpoint_url={endpoint!r})" if endpoint else ")")

    def close(self) -> None:
        self._backend.close()

    # -- reachability
    def check_reachable(self) -> None:
        """Raise StoreError naming the URL when the store cannot be listed or written."""
        try:
            self._backend.check()
        except StoreError as exc:
            msg = str(exc)
            raise StoreError(msg if self.url in msg else f"store {self.url}: {msg}") from None

    # -- manifests
    def _load_manifest(self, digest: str) -> Manifest | None:
        with self._lock:
            cached = self._manifest_cache.get(digest)
        if cached is not None:
            return cached.model_copy(deep=True)
        data = self._backend.read(_manifest_key(digest))
        if data is None:
            return None
        m = self._parse_manifest(digest, data)
        with self._lock:
            self._manifest_cache[digest] = m
        return m.model_copy(deep=True)

    def _parse_manifest(self, digest: str, data: bytes) -> Manifest:
        try:
            m = manifest_from_json(data)
        except (ValidationError, ValueError) as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(first[:3]) if first else type(exc).__name__
            raise StoreError(f"manifest {digest} in store {self.url} is invalid: {detail}") from None
        if m.digest != digest:
            raise StoreError(
                f"manifest {digest} in store {self.url} is corrupt: its content hashes to {m.digest}"
            )
        return m

    def list_manifests(self) -> list[str]:
        """Digests of every manifest in the store, sorted."""
        out = []
        for obj in self._backend.list("manifests"):
            name = obj.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and _HEX64.match(name[:-5]):
                out.append(name[:-5])
        return sorted(out)

    def get_manifest(self, ref_or_digest: str) -> Manifest:
        digest = self.resolve(ref_or_digest)
        m = self._load_manifest(digest)
        if m is None:
            raise StoreError(f"manifest {digest} ({ref_or_digest}) is missing from store {self.url}")
        return m

    # -- refs
    def _read_ref(self, name: str) -> str | None:
        data = self._backend.read(_ref_key(name))
        if data is None:
            return None
        return self._parse_ref(name, data)

    def _parse_ref(self, name: str, data: bytes) -> str:
        try:
            digest = json.loads(data)["digest"]
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"ref {name!r} in store {self.url} is unreadable") from None
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise StoreError(f"ref {name!r} in store {self.url} holds no valid digest")
        return digest

    def resolve(self, ref_or_digest: str) -> str:
        """The manifest digest a ref (or a digest or unique digest prefix) names; StoreError if none."""
        if not isinstance(ref_or_digest, str) or not ref_or_digest.strip():
            raise StoreError("empty ref or digest")
        name = ref_or_digest.strip()
        if name.startswith("sha256:"):
            name = name[len("sha256:") :]
        is_ref = True
        try:
            validate_ref(name)
        except StoreError:
            is_ref = False
        if is_ref:
            self._backend.ensure_ready()
            digest = self._read_ref(name)
            if digest is not None:
                return digest
        if _HEX64.match(name):
            if self._load_manifest(name) is not None:
                return name
        elif _HEX_PREFIX.match(name):
            matches = [d for d in self.list_manifests() if d.startswith(name)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise StoreError(
                    f"digest prefix {name!r} is ambiguous in store {self.url} ({len(matches)} matches)"
                )
        if not is_ref and not _HEX_PREFIX.match(name):
            raise StoreError(f"{ref_or_digest!r} is neither a valid ref name nor a digest (store {self.url})")
        raise StoreError(f"no ref or manifest named {ref_or_digest!r} in store {self.url}")

    def exists(self, ref_or_digest: str) -> bool:
        try:
            self.resolve(ref_or_digest)
        except StoreError:
            return False
        return True

    def set_ref(self, ref: str, digest: str) -> None:
        """Point `ref` at a manifest (a digest, digest prefix or another ref); the move is kept as history."""
        validate_ref(ref)
        target = self.resolve(digest)
        if self._load_manifest(target) is None:
            raise StoreError(f"cannot point ref {ref!r} at {digest!r}: no such manifest in store {self.url}")
        if self._read_ref(ref) != target:  # pointing it where it already points is no move
            self._move_ref(ref, target)

    def _move_ref(self, ref: str, digest: str | None) -> None:
        """Write (or delete) the ref, then record what it holds now. Of concurrent movers, each stamps its
        entry after its own write and reads the ref after stamping, so the newest entry names the ref's
        final target (a mover that lost the race records the winner's target)."""
        if digest is None:
            self._backend.delete(_ref_key(ref))
        else:
            body = json.dumps({"digest": digest, "updated": datetime.now(UTC).isoformat()}).encode()
            self._backend.write(_ref_key(ref), body)
        stamp = f"{time.time_ns():020d}"
        now = self._read_ref(ref)
        self._backend.write(f"ref-history/{ref}/{stamp}-{now or 'deleted'}", b"")

    def delete_ref(self, ref: str, prune_manifest: bool = False) -> None:
        """Remove a ref (its history keeps the deletion). With `prune_manifest`, also remove the manifest
        it named unless another ref names it, so that the next `gc` reclaims its blobs; otherwise
        manifests and blobs stay."""
        validate_ref(ref)
        digest = self._read_ref(ref)
        if digest is None:
            raise StoreError(f"no ref named {ref!r} in store {self.url}")
        self._move_ref(ref, None)
        if prune_manifest:
            self._prune_manifest(digest)

    def _prune_manifest(self, digest: str) -> None:
        """Delete a manifest no ref names; put it back if a ref moved onto it meanwhile."""
        if digest in self.list_refs().values():
            return
        data = self._backend.read(_manifest_key(digest))
        if data is None:
            return
        self._backend.delete(_manifest_key(digest))
        with self._lock:
            self._manifest_cache.pop(digest, None)
        if digest in self.list_refs().values():
            self._backend.write(_manifest_key(digest), data)

    def list_refs(self, prefix: str = "") -> dict[str, str]:
        """{ref name: digest} for every ref whose name starts with `prefix`."""
        names = []
        for obj in self._backend.list("refs"):
            if not obj.key.endswith(".json"):
                continue
            name = obj.key[len("refs/") : -len(".json")]
            if name.startswith(prefix):
                names.append(name)
        data = self._backend.read_many([_ref_key(n) for n in names])
        out: dict[str, str] = {}
        for n in sorted(names):
            raw = data.get(_ref_key(n))
            if raw is not None:
                out[n] = self._parse_ref(n, raw)
        return out

    def ref_history(self, ref: str) -> list[RefMove]:
        """Every move of `ref`, oldest first."""
        validate_ref(ref)
        moves = []
        base = f"ref-history/{ref}/"
        for obj in self._backend.list(f"ref-history/{ref}"):
            rest = obj.key[len(base) :]
            m = _HISTORY_ENTRY.match(rest)
            if m is None:
                continue  # a deeper ref's history
            ns, digest = int(m.group(1)), m.group(2)
            when = datetime.fromtimestamp(ns / 1e9, UTC)
            moves.append(RefMove(ref, None if digest == "deleted" else digest, when))
        return sorted(moves, key=lambda mv: mv.time)

    # -- publish
    def _scan(self, src_dir: Path) -> list[tuple[str, Path]]:
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

    def publish(self, manifest: M, src_dir: Path | None = None, ref: str | None = None) -> M:
        """Upload every file under src_dir that the store lacks, then the manifest, then move `ref`.
        Returns a copy of `manifest` whose `files` lists src_dir's files; its `.digest` names it.

        Without src_dir, every blob the manifest names must already be in the store."""
        if ref is not None:
            validate_ref(ref)
        label = f"artifact {manifest.name or manifest.kind}"
        if src_dir is not None:
            src_dir = Path(src_dir)
            files = self._scan(src_dir)
            self._backend.ensure_ready(write=True)
            entries = self._hash_and_upload(files, label)
            new = manifest.model_copy(update={"files": dict(sorted(entries.items()))})
        else:
            for path in manifest.files:
                _check_path(path, f"cannot publish {label}")
            self._backend.ensure_ready(write=True)
            new = manifest.model_copy(deep=True)
            missing = self._missing_blobs(new.files)
            if missing:
                path = sorted(missing)[0]
                raise StoreError(
                    f"cannot publish {label}: file {path} (blob {new.files[path].sha256}) is not in store "
                    f"{self.url}; publish it with src_dir"
                )
        # Round-trip through JSON so that what is stored parses back to the same digest.
        data = new.canonical_json()
        try:
            parsed = manifest_from_json(data)
        except (ValidationError, ValueError) as exc:
            raise StoreError(f"cannot publish {label}: manifest does not validate: {exc}") from None
        digest = new.digest
        if parsed.digest != digest:
            raise StoreError(f"cannot publish {label}: manifest does not round-trip through JSON")
        existing = self._backend.read(_manifest_key(digest))
        if existing is None:
            self._backend.write(_manifest_key(digest), data)
            stored: Manifest = new
        else:
            stored = self._parse_manifest(digest, existing)
        # A concurrent `gc` may have set aside an old unreferenced blob this publish relied on (after the
        # checks above, before it could see this manifest): put it back, now that the manifest protects it.
        missing = self._missing_blobs(new.files)
        if missing and src_dir is None:
            if existing is None:
                self._backend.delete(_manifest_key(digest))
            path = sorted(missing)[0]
            raise StoreError(
                f"cannot publish {label}: file {path} (blob {new.files[path].sha256}) vanished from store "
                f"{self.url} while publishing (a concurrent gc?); publish it with src_dir"
            )
        if missing and src_dir is not None:
            local = dict(files)
            self._backend.upload(
                [
                    UploadJob(
                        _blob_key(e.sha256), local[p], e.size, _stat_sig(local[p]), f"{label}: file {p}"
                    )
                    for p, e in new.files.items()
                    if p in missing
                ],
                self._counters,
            )
        with self._lock:
            self._manifest_cache[digest] = stored
        if ref is not None and self._read_ref(ref) != digest:
            self._move_ref(ref, digest)
        return stored.model_copy(deep=True)  # type: ignore[return-value]

    def _missing_blobs(self, files: dict[str, FileEntry]) -> set[str]:
        keys = {_blob_key(e.sha256): e for e in files.values()}
        infos = self._backend.stat_many(sorted(keys))
        bad_shas = {e.sha256 for k, e in keys.items() if infos.get(k) is None or infos[k].size != e.size}
        return {p for p, e in files.items() if e.sha256 in bad_shas}

    def _hash_and_upload(self, files: list[tuple[str, Path]], label: str) -> dict[str, FileEntry]:
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
                    info = self._backend.stat(_blob_key(entry.sha256))
                    if info is not None and info.size == entry.size:
                        continue
                    yield UploadJob(_blob_key(entry.sha256), full, entry.size, sig, f"{label}: file {rel}")
            finally:
                for fut in futures:
                    fut.cancel()

        with ThreadPoolExecutor(hashers) as pool:
            self._backend.upload(jobs(pool), self._counters)
        return entries

    # -- fetch
    def fetch(self, ref_or_digest: str) -> Path:
        """Materialize the artifact into the local cache folder keyed by its digest, verifying every
        sha256 (StoreError naming the artifact and file on mismatch). A second fetch transfers nothing."""
        digest = self._resolve_for_fetch(ref_or_digest)
        final = self.cache_dir / digest
        m = self._cached_manifest(digest)
        if m is not None and final.is_dir() and self._cache_valid(final, digest, m):
            return final
        m = self.get_manifest(digest)
        label = f"artifact {m.name or m.kind} ({digest[:12]})"
        for path in m.files:
            _check_path(path, f"cannot fetch {label}")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._clean_cache_tmp()
        if final.exists():  # incomplete or modified copy: replace it
            self._discard(final)
        tmp = self.cache_dir / f".tmp-{digest[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            jobs = []
            root = tmp.resolve()
            for path, entry in sorted(m.files.items()):
                dest = (tmp / path).resolve()
                if root not in dest.parents:
                    raise StoreError(f"cannot fetch {label}: file {path} escapes the artifact folder")
                dest.parent.mkdir(parents=True, exist_ok=True)
                jobs.append(
                    DownloadJob(
                        _blob_key(entry.sha256), dest, entry.size, entry.sha256, f"{label}: file {path}"
                    )
                )
            # Several files with the same content: download once, copy locally.
            by_sha: dict[str, DownloadJob] = {}
            copies: list[tuple[DownloadJob, DownloadJob]] = []
            for job in jobs:
                if job.sha256 in by_sha:
                    copies.append((by_sha[job.sha256], job))
                else:
                    by_sha[job.sha256] = job
            self._backend.download(list(by_sha.values()), self._counters)
            for src, dst in copies:
                shutil.copyfile(src.dest, dst.dest)
            for job in jobs:
                os.chmod(job.dest, 0o444)
            self._remember_manifest(digest, m)
            try:
                os.rename(tmp, final)
                self._write_marks(digest, {p: _file_sig(final / p) for p in m.files})
            except OSError:
                if final.is_dir() and self._cache_valid(final, digest, m):  # a concurrent fetch won
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _resolve_for_fetch(self, ref_or_digest: str) -> str:
        name = ref_or_digest.strip() if isinstance(ref_or_digest, str) else ref_or_digest
        if isinstance(name, str) and _HEX64.match(name) and (self.cache_dir / name).is_dir():
            if self._cached_manifest(name) is not None:
                return name  # full digest already cached: no need to ask the store
        return self.resolve(ref_or_digest)

    def _manifest_copy_path(self, digest: str) -> Path:
        return self.cache_dir / ".manifests" / f"{digest}.json"

    def _remember_manifest(self, digest: str, m: Manifest) -> None:
        path = self._manifest_copy_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(m.canonical_json())
        os.replace(tmp, path)

    def _cached_manifest(self, digest: str) -> Manifest | None:
        path = self._manifest_copy_path(digest)
        try:
            m = manifest_from_json(path.read_bytes())
        except (OSError, ValidationError, ValueError):
            return None
        return m if m.digest == digest else None

    def _marks_path(self, digest: str) -> Path:
        return self.cache_dir / ".manifests" / f"{digest}.verified"

    def _write_marks(self, digest: str, marks: dict[str, tuple[int, ...]]) -> None:
        """Remember each cached file's stat signature as of its last sha256 check."""
        path = self._marks_path(digest)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps({p: list(sig) for p, sig in marks.items()}))
        os.replace(tmp, path)

    def _cache_valid(self, folder: Path, digest: str, m: Manifest) -> bool:
        """Whether every file of the cached copy still has its manifest's bytes. A file whose stat
        signature (size, mtime, ctime, inode) changed since its last check is hashed again."""
        try:
            marks = json.loads(self._marks_path(digest).read_text())
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
                self._write_marks(digest, {p: tuple(marks[p]) for p in m.files})
        return True

    def _discard(self, folder: Path) -> None:
        trash = self.cache_dir / f".tmp-trash-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_cache_tmp(self, max_age_s: float = 24 * 3600) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.cache_dir):
                if entry.name.startswith(".tmp-") and now - entry.stat().st_mtime > max_age_s:
                    shutil.rmtree(entry.path, ignore_errors=True)

    # -- maintenance
    def verify(self, hashes: bool = True) -> VerifyReport:
        """Check every manifest (parses, digest matches) and its blobs (present, size, sha256) and refs."""
        report = VerifyReport()
        digests = self.list_manifests()
        raw = self._backend.read_many([_manifest_key(d) for d in digests])
        needed: dict[str, tuple[int, list[str]]] = {}
        for d in digests:
            data = raw.get(_manifest_key(d))
            if data is None:
                report.problems.append(f"manifest {d}: vanished while verifying")
                continue
            try:
                m = self._parse_manifest(d, data)
            except StoreError as exc:
                report.problems.append(str(exc))
                continue
            report.manifests += 1
            for path, entry in m.files.items():
                size, users = needed.setdefault(entry.sha256, (entry.size, []))
                users.append(f"artifact {m.name or m.kind} ({d[:12]}): file {path}")
                if size != entry.size:
                    report.problems.append(
                        f"{users[-1]}: size {entry.size} disagrees with another manifest ({size})"
                    )
        present = {obj.key: obj for obj in self._backend.list("blobs")}
        to_hash = []
        for sha, (size, users) in sorted(needed.items()):
            obj = present.get(_blob_key(sha))
            if obj is None:
                report.problems.append(f"{users[0]}: blob {sha} is missing")
            elif obj.size != size:
                report.problems.append(f"{users[0]}: blob {sha} has {obj.size} bytes, manifest says {size}")
            else:
                report.blobs += 1
                to_hash.append(sha)
        if hashes and to_hash:
            got = self._backend.hash_objects([_blob_key(s) for s in to_hash])
            for sha in to_hash:
                res = got[_blob_key(sha)]
                if isinstance(res, Exception):
                    report.problems.append(
                        f"{needed[sha][1][0]}: blob {sha} unreadable: {type(res).__name__}"
                    )
                elif res != sha:
                    report.problems.append(f"{needed[sha][1][0]}: blob {sha} is corrupt (hashes to {res})")
                else:
                    report.bytes_hashed += needed[sha][0]
        known = set(digests)
        try:
            refs = self.list_refs()
        except StoreError as exc:
            report.problems.append(str(exc))
            refs = {}
        for name, d in refs.items():
            report.refs += 1
            if d not in known:
                report.problems.append(f"ref {name!r} points at missing manifest {d}")
        return report

    def _referenced_blobs(self) -> set[str]:
        """sha256 of every blob some manifest names (StoreError while a manifest is unreadable)."""
        referenced: set[str] = set()
        digests = self.list_manifests()
        raw = self._backend.read_many([_manifest_key(d) for d in digests])
        for d in digests:
            data = raw.get(_manifest_key(d))
            if data is None:
                continue
            m = self._parse_manifest(d, data)  # refuse to collect anything while a manifest is unreadable
            referenced.update(e.sha256 for e in m.files.values())
        return referenced

    def gc(self, grace: timedelta = timedelta(hours=24), dry_run: bool = False) -> GcReport:
        """Delete blobs no manifest names that are older than `grace` (and stale partial uploads).

        Doomed blobs are moved to trash/ first; the manifests are then read again and any blob a manifest
        now names (a concurrent publish reused it) is put back, the rest deleted."""
        report = GcReport(dry_run=dry_run)
        cutoff = time.time() - grace.total_seconds()
        blobs = self._backend.list("blobs")  # listed before the manifests: newer manifests protect theirs
        referenced = self._referenced_blobs()
        report.blobs_total = len(blobs)
        doomed: list[ObjInfo] = []
        for obj in blobs:
            if obj.key.rsplit("/", 1)[-1] in referenced:
                continue
            if obj.mtime > cutoff:
                report.blobs_kept_recent += 1
            else:
                doomed.append(obj)
        if dry_run:
            report.blobs_deleted = len(doomed)
            report.bytes_deleted = sum(obj.size for obj in doomed)
        else:
            for obj in doomed:
                self._backend.move(obj.key, f"{TRASH}{obj.key.rsplit('/', 1)[-1]}")
            self._empty_trash(report)
        report.stale_uploads_removed = self._backend.cleanup_stale(cutoff, dry_run)
        return report

    def _empty_trash(self, report: GcReport) -> None:
        """Put back every blob in trash/ that a manifest names now; delete the others."""
        trash = self._backend.list(TRASH.rstrip("/"))  # also what an interrupted gc left there
        if not trash:
            return
        referenced = self._referenced_blobs()
        for obj in trash:
            sha = obj.key.rsplit("/", 1)[-1]
            if not _HEX64.match(sha):
                continue
            if sha in referenced:
                if self._backend.stat(_blob_key(sha)) is None:
                    self._backend.move(obj.key, _blob_key(sha))
                else:  # the publisher uploaded it again
                    self._backend.delete(obj.key)
                continue
            report.blobs_deleted += 1
            report.bytes_deleted += obj.size
            self._backend.delete(obj.key)

    def delete_manifest(self, digest: str) -> None:
        """Remove a manifest no ref points at (its blobs go at the next `gc`)."""
        d = self.resolve(digest)
        users = [name for name, target in self.list_refs().items() if target == d]
        if users:
            raise StoreError(
                f"manifest {d} is still named by ref(s) {', '.join(users)}: delete or move them first"
            )
        self._backend.delete(_manifest_key(d))
        with self._lock:
            self._manifest_cache.pop(d, None)
