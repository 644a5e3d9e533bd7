"""The obstore (Rust object_store) side of the S3 backend: blob bytes in multipart puts and ranged gets
hashed in order, used where there is an endpoint URL (or when asked for)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
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
from vinasmol_core.store.backends.s3_common import S3Target
from vinasmol_core.store.hashing import _stat_sig

# Backoff from 0.5 s doubling to 10 s, 12 retries: a server that restarts or stalls for up to a minute
# is ridden out (obstore's default, 10 retries from 0.1 s, gives up within about 2 s of connection
# refusals), and a store that stays down fails after about 90 s.
RETRY = {
    "max_retries": 12,
    "backoff": {"init_backoff": timedelta(seconds=0.5), "max_backoff": timedelta(seconds=10), "base": 2.0},
    "retry_timeout": timedelta(seconds=180),
}


def _failed(target: S3Target, what: str, exc: Exception) -> StoreError:
    """A StoreError for an obstore error, with its first line (the rest is the retry chain), scrubbed."""
    text = target.scrub(str(exc).strip())
    first = text.splitlines()[0] if text else type(exc).__name__
    return StoreError(f"{what}: {first[:400]}")


class _ObstoreData:
    """Blob bytes through obstore (Rust object_store): multipart puts, ranged gets hashed in order."""

    def __init__(
        self,
        target: S3Target,
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
        self.target = target
        self.store = S3Store(
            target.bucket,
            prefix=target.prefix or None,
            client_options=client,
            retry_config=RETRY,  # type: ignore[arg-type]
            **opts,  # type: ignore[arg-type]
        )

    def _put(self, job: UploadJob, counters: _Counters) -> None:
        import obstore

        multipart = job.size >= self.target.multipart_threshold
        conc = self.target.concurrency
        try:
            obstore.put(
                self.store,
                job.key,
                job.path,
                use_multipart=multipart,
                chunk_size=self.target.part_size,
                max_concurrency=conc,
            )
        except Exception as exc:  # obstore's own errors, after its retries
            what = f"{job.label}: uploading blob {job.sha256} to store {self.target.url}"
            raise _failed(self.target, what, exc) from None
        if _stat_sig(job.path) != job.sig:
            obstore.delete(self.store, job.key)
            raise StoreError(f"{job.label}: the file changed while it was being published")
        counters.up(job.size)

    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(
            max(1, self.target.concurrency // 2), thread_name_prefix="vinasmol-obs"
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

        start = index * self.target.part_size
        length = min(self.target.part_size, job.size - start)
        try:
            data = obstore.get_range(self.store, job.key, start=start, length=length)
        except FileNotFoundError:
            raise StoreError(
                f"{job.label}: blob {job.sha256} is missing from store {self.target.url}; {REPUBLISH_HINT}"
            ) from None
        except Exception as exc:  # obstore's own errors, after its retries
            what = f"{job.label}: reading blob {job.sha256} from store {self.target.url}"
            raise _failed(self.target, what, exc) from None
        view = memoryview(data)
        if len(view) != length:
            raise StoreError(_short(job))
        written = 0
        while written < length:
            written += os.pwritev(fd, [view[written:]], start + written)
        buf = getattr(bufs, "buf", None)
        if buf is None:
            buf = bufs.buf = bytearray(self.target.part_size)
        progress.part_done(index, view, buf)

    def _get_empty(self, job: DownloadJob) -> None:
        import obstore

        try:
            data = obstore.get(self.store, job.key).bytes()
        except FileNotFoundError:
            raise StoreError(
                f"{job.label}: blob {job.sha256} is missing from store {self.target.url}; {REPUBLISH_HINT}"
            ) from None
        if len(data):
            raise StoreError(f"{job.label}: store blob {job.sha256} is not empty as the manifest says")

    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:
        bufs = threading.local()
        opened: list[tuple[DownloadJob, int, _HashProgress, list[Future[None]]]] = []
        with ThreadPoolExecutor(self.target.concurrency, thread_name_prefix="vinasmol-obs") as pool:
            try:
                for job in jobs:
                    fd = os.open(job.dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    progress = _HashProgress(fd, job.size, self.target.part_size)
                    if job.size == 0:
                        futs = [pool.submit(self._get_empty, job)]
                    else:
                        n = (job.size + self.target.part_size - 1) // self.target.part_size
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
