"""Key layout of a store (blobs, manifests, refs, trash), ref names and the default locations."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from vinasmol_core.common.errors import StoreError
from vinasmol_core.common.manifests import check_relative_path

SUPPORTED_SCHEMES = ("file", "s3", "memory")
TRASH = "trash/"  # where gc sets doomed blobs aside before deleting them

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")
_REF_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]*$")
_HISTORY_ENTRY = re.compile(r"^(\d{20})-([0-9a-f]{64}|deleted)$")


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


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return parts._replace(netloc=host).geturl()
    return url
