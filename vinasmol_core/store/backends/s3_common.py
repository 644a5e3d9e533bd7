"""What every S3 data path shares: the bucket, prefix and transfer sizes (`S3Target`), and how a failed
S3 call becomes a StoreError that names the store but never the credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vinasmol_core.common.errors import StoreError
from vinasmol_core.store.layout import _redact_url


@dataclass(frozen=True)
class S3Target:
    """One store in a bucket: where its keys live and how big its transfers are.

    `secrets` (keys, secret, session token, and those a profile or role yields once they are known)
    are scrubbed from messages; neither they nor an endpoint's user and password appear in the repr.
    """

    bucket: str
    prefix: str  # without leading or trailing '/'
    endpoint_url: str | None
    secrets: list[str] = field(repr=False, compare=False)  # grows: see add_secrets
    concurrency: int
    part_size: int

    def __repr__(self) -> str:
        return (
            f"S3Target(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint!r}, "
            f"concurrency={self.concurrency}, part_size={self.part_size})"
        )

    @property
    def endpoint(self) -> str | None:
        """The endpoint URL without user or password (what messages show)."""
        return _redact_url(self.endpoint_url) if self.endpoint_url else None

    def add_secrets(self, *values: str | None) -> None:
        """Scrub these too from now on (credentials found later: a profile's, a role's, a token)."""
        for value in values:
            if value and value not in self.secrets:
                self.secrets.append(value)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def multipart_threshold(self) -> int:
        """Files at least this big are uploaded in parts."""
        return 2 * self.part_size

    @property
    def where(self) -> str:
        return f"{self.url}" + (f" (endpoint {self.endpoint})" if self.endpoint_url else "")

    def key(self, key: str) -> str:
        """The bucket key of a store key."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def rel(self, full: str) -> str:
        """The store key of a bucket key."""
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def scrub(self, text: str) -> str:
        """`text` without any secret, and with the endpoint's user and password left out."""
        if self.endpoint_url and self.endpoint != self.endpoint_url:
            text = text.replace(self.endpoint_url, str(self.endpoint))
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, "***")
        return text


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


def _is_connect_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, aiohttp.ClientConnectionError)


def s3_error(target: S3Target, exc: BaseException, what: str) -> StoreError:
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
        return _client_error(target, exc.response, what)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StoreError(
            f"no S3 credentials for store {target.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, EndpointConnectionError | ConnectionError | TimeoutError) or _is_connect_error(exc):
        return StoreError(
            f"cannot reach S3 endpoint {target.endpoint or 'AWS'} for store {target.url}: "
            f"{type(exc).__name__}"
        )
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return StoreError(f"{what} for store {target.url} failed: {exc.strerror}{where}")
    return StoreError(
        f"S3 {what} failed on store {target.where}: {type(exc).__name__}: {target.scrub(str(exc))}"
    )


def _client_error(target: S3Target, response: dict[str, Any], what: str) -> StoreError:
    """The StoreError for an error response of the S3 server."""
    err = response.get("Error", {})
    code = str(err.get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and what == "head_bucket"):
        return StoreError(f"bucket {target.bucket!r} does not exist (store {target.where})")
    if code in (
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403",
        "Forbidden",
    ) or (status == 403):
        return StoreError(
            f"access denied to store {target.where} ({code or status}): check the S3 credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the store's key/secret options)"
        )
    msg = target.scrub(str(err.get("Message", "")))
    return StoreError(f"S3 {what} failed on store {target.where}: {code or status} {msg}".rstrip())
