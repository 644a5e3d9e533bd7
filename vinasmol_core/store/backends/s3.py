"""An S3 bucket (any S3-compatible server): aiobotocore for every call, obstore for blob bytes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from vinasmol_core.errors import StoreError
from vinasmol_core.store.backends.base import (
    DownloadJob,
    ObjInfo,
    UploadJob,
    _Backend,
    _Counters,
    _mismatch,
    _short,
)
from vinasmol_core.store.hashing import CHUNK, _stat_sig
from vinasmol_core.store.layout import _redact_url

PART_SIZE = 8 << 20  # default S3 multipart part size (also the ranged-GET size on fetch)
DATA_PATHS = ("auto", "obstore", "aiobotocore")  # S3 blob transfers; auto: obstore when there is an endpoint


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
