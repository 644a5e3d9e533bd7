"""The aiobotocore side of the S3 backend: its client and event loop (through s3fs), and the blob data path
without obstore: parallel multipart puts, ranged gets written and hashed in order, streamed hashing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from vinasmol_core.common.errors import StoreError
from vinasmol_core.store.backends.base import (
    REPUBLISH_HINT,
    DownloadJob,
    UploadJob,
    _Counters,
    _mismatch,
    _short,
)
from vinasmol_core.store.backends.s3_common import S3Target, error_code, is_missing, s3_error
from vinasmol_core.store.hashing import CHUNK, _stat_sig

_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA256", "ChecksumCRC64NVME")

log = logging.getLogger(__name__)


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


def _changed(job: UploadJob) -> StoreError:
    return StoreError(f"{job.label}: the file changed while it was being published")


class _AioData:
    """Calls through the s3fs filesystem's aiobotocore client, run on its event loop."""

    def __init__(self, target: S3Target, fs: Any) -> None:
        self.target = target
        self.fs = fs

    async def client(self):  # noqa: ANN201
        s3 = await self.fs.set_session()
        if not getattr(s3, "_vinasmol_retry_log", False):  # one client may serve several stores
            s3.meta.events.register_first("needs-retry.s3", self._note_failure)
            s3.meta.events.register("request-created.s3", self._log_retry)
            s3._vinasmol_retry_log = True
        return s3

    @staticmethod
    def _note_failure(
        request_dict: dict[str, Any] | None = None, response: Any = None, caught_exception: Any = None,
        **_: Any,
    ) -> None:
        """Remember why an attempt failed (botocore decides whether to retry; this decides nothing)."""
        if request_dict is None:
            return
        if caught_exception is not None:
            why = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None:
            why = f"HTTP {response[0].status_code}"
        else:
            return
        request_dict["context"]["vinasmol_failure"] = why

    def _log_retry(self, request: Any = None, operation_name: str = "", **_: Any) -> None:
        """One WARNING line per retried S3 call (botocore logs its retries at DEBUG only)."""
        context = getattr(request, "context", None) or {}
        attempt = context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            why = self.target.scrub(str(context.get("vinasmol_failure", "an error")))[:200]
            log.warning("S3 %s in %s: retrying (attempt %d) after %s", operation_name, self.target.url,
                        attempt, why)

    def error(self, exc: BaseException, what: str) -> StoreError:
        return s3_error(self.target, exc, what)

    def run(self, coro_fn: Callable[[], Any], what: str) -> Any:
        """Run a coroutine on the client's loop; any failure becomes a StoreError."""
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, coro_fn)
        except StoreError:
            raise
        except Exception as exc:
            raise self.error(exc, what) from None

    # -- upload
    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:
        """Start each job as soon as the iterator yields it (hashing of later files overlaps uploads)."""
        sem = asyncio.Semaphore(self.target.concurrency)  # binds to the loop on first use
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
                raise self.error(errors[0], "upload")

    async def _upload_one(self, job: UploadJob, counters: _Counters, sem: asyncio.Semaphore) -> None:
        s3 = await self.client()
        key = self.target.key(job.key)
        fd = os.open(job.path, os.O_RDONLY)
        try:
            if job.size < self.target.multipart_threshold:
                async with sem:
                    data = await asyncio.to_thread(os.pread, fd, job.size, 0)
                    if _stat_sig(job.path) != job.sig or len(data) != job.size:
                        raise _changed(job)
                    await s3.put_object(Bucket=self.target.bucket, Key=key, Body=data)
            else:
                await self._upload_parts(s3, key, fd, job, sem)
            counters.up(job.size)
        finally:
            os.close(fd)

    async def _upload_parts(self, s3: Any, key: str, fd: int, job: UploadJob, sem: asyncio.Semaphore) -> None:
        """A multipart upload of the whole file, aborted on any failure."""
        bucket = self.target.bucket
        mpu = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        try:

            async def part(number: int, offset: int) -> dict[str, Any]:
                async with sem:
                    length = min(self.target.part_size, job.size - offset)
                    data = await asyncio.to_thread(os.pread, fd, length, offset)
                    if len(data) != length:
                        raise _changed(job)
                    r = await s3.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                    )
                entry = {"PartNumber": number, "ETag": r["ETag"]}
                for ck in _CHECKSUMS:
                    if r.get(ck):
                        entry[ck] = r[ck]
                return entry

            offsets = range(0, job.size, self.target.part_size)
            parts = await asyncio.gather(*(part(i + 1, off) for i, off in enumerate(offsets)))
            if _stat_sig(job.path) != job.sig:
                raise _changed(job)
            await s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
            raise

    # -- download
    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:
        async def go() -> None:
            conc = self.target.concurrency
            sem, window = asyncio.Semaphore(conc), asyncio.Semaphore(2 * conc)
            tasks = [asyncio.ensure_future(self._download_one(j, counters, sem, window)) for j in jobs]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        self.run(go, "download")

    async def _get_range(self, key: str, start: int, end: int, job: DownloadJob) -> list[bytes]:
        """The bytes [start, end) of an object as the chunks the socket delivered (no joining copy)."""
        s3 = await self.client()
        last: BaseException | None = None
        for attempt in range(4):
            try:
                kwargs: dict[str, Any] = {"Bucket": self.target.bucket, "Key": key}
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
                if is_missing(exc) or error_code(exc) == "NoSuchKey":
                    raise StoreError(
                        f"{job.label}: blob {job.sha256} is missing from store {self.target.url}; "
                        + REPUBLISH_HINT
                    ) from None
                if error_code(exc) == "InvalidRange":
                    raise StoreError(_short(job)) from None
                if isinstance(exc, StoreError) or error_code(exc) in ("AccessDenied", "InvalidAccessKeyId"):
                    raise
                last = exc
                if attempt < 3:
                    log.warning("S3 ranged get of blob %s in %s: retrying (attempt %d) after %s",
                                job.sha256[:12], self.target.url, attempt + 2,
                                self.target.scrub(f"{type(exc).__name__}: {exc}")[:200])
                await asyncio.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    async def _download_one(
        self, job: DownloadJob, counters: _Counters, sem: asyncio.Semaphore, window: asyncio.Semaphore
    ) -> None:
        key = self.target.key(job.key)
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
                await self._download_parts(key, job, fd, h, sem, window)
            counters.down(job.size)
        finally:
            os.close(fd)
        got = h.hexdigest()
        if got != job.sha256:
            raise _mismatch(job, got)

    async def _download_parts(
        self,
        key: str,
        job: DownloadJob,
        fd: int,
        h: Any,
        sem: asyncio.Semaphore,
        window: asyncio.Semaphore,
    ) -> None:
        """Ranged gets of every part, each written at its offset, all hashed into `h` in order."""
        part_size = self.target.part_size
        pending: dict[int, list[bytes]] = {}
        state = {"next": 0}
        lock = asyncio.Lock()
        starts = list(range(0, job.size, part_size))

        async def part(index: int, start: int) -> None:
            end = min(start + part_size, job.size)
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

    # -- verify
    def hash_objects(self, keys: list[str]) -> dict[str, str | Exception]:
        sem = asyncio.Semaphore(self.target.concurrency)

        async def one(k: str) -> str | Exception:
            try:
                h = hashlib.sha256()
                s3 = await self.client()
                async with sem:
                    resp = await s3.get_object(Bucket=self.target.bucket, Key=self.target.key(k))
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

        return dict(zip(keys, self.run(go, "verify"), strict=True))
