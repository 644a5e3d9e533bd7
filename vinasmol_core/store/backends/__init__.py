"""The backends a store URL can name, and `open_backend`, the one place that picks one."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from vinasmol_core.common.errors import StoreError
from vinasmol_core.store.backends.base import _Backend
from vinasmol_core.store.backends.local import _LocalBackend, _MemoryBackend
from vinasmol_core.store.backends.s3 import PART_SIZE, _S3Backend
from vinasmol_core.store.layout import SUPPORTED_SCHEMES, _redact_url, default_store_url


def open_backend(
    url: str | None,
    *,
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    max_workers: int = 8,
    data_path: str = "auto",
    part_size: int = PART_SIZE,
) -> _Backend:
    """The backend for a store URL (`file://`, a plain path, `s3://`, `memory://`); `url` defaults to
    $VINASMOL_STORE, else file:// under the user's data folder."""
    raw = (url or "").strip() or default_store_url()
    if "://" not in raw:  # a plain path
        raw = Path(raw).expanduser().resolve().as_uri()
    scheme = raw.split("://", 1)[0].lower()
    if scheme == "file":
        path = raw[len("file://") :]
        if not path:
            raise StoreError(f"store URL {raw!r} names no folder")
        return _LocalBackend(Path(path).expanduser().resolve(), max_workers)
    if scheme in ("s3", "s3a"):
        return _open_s3(raw, endpoint_url, key, secret, max_workers, data_path, part_size)
    if scheme == "memory":
        return _MemoryBackend(raw[len("memory://") :], max_workers)
    raise StoreError(
        f"unknown store URL scheme {scheme!r} in {_redact_url(raw)!r}: use "
        + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
    )


def _open_s3(
    raw: str,
    endpoint_url: str | None,
    key: str | None,
    secret: str | None,
    max_workers: int,
    data_path: str,
    part_size: int,
) -> _S3Backend:
    """An S3 backend; credentials and endpoint default to the AWS_* environment variables."""
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
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )
    return _S3Backend(
        bucket,
        parts.path,
        endpoint,
        key if key is not None else os.environ.get("AWS_ACCESS_KEY_ID"),
        secret if secret is not None else os.environ.get("AWS_SECRET_ACCESS_KEY"),
        max_workers,
        token=os.environ.get("AWS_SESSION_TOKEN") if key is None else None,
        data_path=data_path,
        part_size=part_size,
    )


__all__ = ["open_backend"]
