"""An S3 bucket (any S3-compatible server): aiobotocore (`s3_aio`) for every call and, where there is an
endpoint URL, obstore (`s3_obstore`) for blob bytes."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from vinasmol_core.common.errors import StoreError
from vinasmol_core.store.backends.base import DownloadJob, ObjInfo, UploadJob, _Backend, _Counters
from vinasmol_core.store.backends.s3_aio import _AioData
from vinasmol_core.store.backends.s3_common import S3Target, is_missing
from vinasmol_core.store.backends.s3_obstore import _ObstoreData

log = logging.getLogger(__name__)

PART_SIZE = 8 << 20  # default S3 multipart part size (also the ranged-GET size on fetch)
DATA_PATHS = ("auto", "obstore", "aiobotocore")  # S3 blob transfers; auto: obstore when there is an endpoint


CONNECT_WAIT_S = 30.0  # how long a store opened during a run waits for its S3 endpoint to answer


def _client_config(concurrency: int, endpoint_url: str | None) -> dict[str, Any]:
    """botocore settings of the aiobotocore client."""
    config: dict[str, Any] = {
        # The body is covered by a CRC32 checksum; signing it too would hash every byte twice more.
        "s3": {"payload_signing_enabled": False},
        "request_checksum_calculation": "when_supported",
        "response_checksum_validation": "when_required",  # fetch verifies sha256 itself
        "max_pool_connections": max(10, 2 * concurrency + 4),
        "retries": {"max_attempts": 10, "mode": "standard"},  # ~1 min of backoff: a restarting server
        "connect_timeout": 10,
        "read_timeout": 120,
    }
    if endpoint_url:
        config["s3"]["addressing_style"] = "path"
    return config


class _S3Backend(_Backend):
    """An S3 bucket (and key prefix): small objects and listings here, blob bytes through obstore or
    aiobotocore's parallel multipart transfers."""

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

        if part_size < 5 << 20:
            raise StoreError(f"S3 part size {part_size} is below the 5 MiB that S3 requires")
        self.target = S3Target(
            bucket=bucket,
            prefix=prefix.strip("/"),
            endpoint_url=endpoint_url,
            secrets=[s for s in (key, secret, token) if s],
            concurrency=max(1, max_workers),
            part_size=part_size,
        )
        self.bucket = bucket
        self.prefix = self.target.prefix
        self.endpoint_url = endpoint_url
        self.url = self.target.url
        self.concurrency = self.target.concurrency
        self.part_size = part_size
        self.multipart_threshold = self.target.multipart_threshold
        self.fs = s3fs.S3FileSystem(
            key=key,
            secret=secret,
            token=token,
            endpoint_url=endpoint_url,
            # Stores with the same endpoint and credentials share one client (and its connection pool):
            # creating one costs about a second of CPU. The instance cache resets itself after fork.
            use_listings_cache=False,
            config_kwargs=_client_config(self.concurrency, endpoint_url),
        )
        self._aio = _AioData(self.target, self.fs)
        self._ready = False
        self._creds = (key, secret, token) if key and secret else None
        if data_path not in DATA_PATHS:
            raise StoreError(f"unknown S3 data path {data_path!r}: use one of {', '.join(DATA_PATHS)}")
        self._obs_args = (endpoint_url, key, secret, token)
        self._obs: _ObstoreData | None = None
        self._use_obstore = data_path == "obstore" or (data_path == "auto" and bool(endpoint_url))

    def __repr__(self) -> str:
        return f"_S3Backend({self.url!r}, endpoint_url={self.target.endpoint!r})"

    # -- plumbing
    @property
    def where(self) -> str:
        return self.target.where

    def _k(self, key: str) -> str:
        return self.target.key(key)

    async def _client(self):  # noqa: ANN202
        return await self._aio.client()

    def _run(self, coro_fn: Callable[[], Any], what: str) -> Any:
        return self._aio.run(coro_fn, what)

    # -- readiness
    def ensure_ready(self, write: bool = False, wait: float = CONNECT_WAIT_S) -> None:
        if self._ready:
            return
        self._probe_endpoint(wait)

        async def go() -> Any:
            s3 = await self._client()
            await s3.head_bucket(Bucket=self.bucket)
            if self._creds is None:  # environment, profile, role...: ask the session
                creds = await self.fs.session.get_credentials()
                return None if creds is None else await creds.get_frozen_credentials()
            return None

        frozen = self._run(go, "head_bucket")
        if frozen is not None:  # scrubbed from messages like the keys given
            self.target.add_secrets(frozen.access_key, frozen.secret_key, frozen.token)
        if self._use_obstore:
            endpoint, key, secret, token = self._obs_args
            if self._creds is None and frozen is not None:
                key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
            if key and secret:
                self._obs = _ObstoreData(self.target, endpoint, key, secret, token)
            # else: aiobotocore reports the missing credentials
        self._ready = True

    def _probe_endpoint(self, wait: float) -> None:
        """Fail with a clear error (no retry storm) when nothing listens at a custom endpoint, after
        trying again with backoff for `wait` seconds (a server restarting during a run)."""
        if not self.endpoint_url:
            return
        parts = urlsplit(self.endpoint_url)
        if not parts.hostname:
            raise StoreError(f"S3 endpoint {self.target.endpoint!r} of store {self.url} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        start, pause = time.monotonic(), 0.5
        deadline = start + wait
        while True:
            try:
                with socket.create_connection((parts.hostname, port), timeout=10):
                    return
            except OSError as exc:
                if time.monotonic() + pause > deadline:
                    waited = f" (tried for {time.monotonic() - start:.0f} s)" if wait else ""
                    raise StoreError(
                        f"cannot reach S3 endpoint {self.target.endpoint} for store {self.url}{waited}: "
                        f"{exc.strerror or exc}"
                    ) from None
                log.warning("S3 endpoint %s of store %s: %s; trying again in %.1f s", self.target.endpoint,
                            self.url, exc.strerror or exc, pause)
            time.sleep(pause)
            pause = min(2 * pause, 8.0)

    def check(self) -> None:
        """Reachable and writable now: no waiting for the endpoint (the check before a run)."""
        self._ready = False
        self.ensure_ready(wait=0)
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
            if is_missing(exc):
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
            if is_missing(exc):
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
                        ObjInfo(
                            self.target.rel(obj["Key"]), int(obj["Size"]), obj["LastModified"].timestamp()
                        )
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
    def upload(self, jobs: Iterable[UploadJob], counters: _Counters) -> None:
        """Start each job as soon as the iterator yields it (hashing of later files overlaps uploads)."""
        self.ensure_ready()
        if self._obs is not None:
            return self._obs.upload(jobs, counters)
        return self._aio.upload(jobs, counters)

    def download(self, jobs: list[DownloadJob], counters: _Counters) -> None:
        self.ensure_ready()
        if self._obs is not None:
            return self._obs.download(jobs, counters)
        return self._aio.download(jobs, counters)

    def hash_objects(self, keys: list[str]) -> dict[str, str | Exception]:
        self.ensure_ready()
        return self._aio.hash_objects(keys)

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
