"""Content-addressed artifact store over an fsspec URL (file://, s3://, memory://).

Layout under the root URL:
    blobs/<sha[:2]>/<sha256>          immutable file contents
    manifests/<digest>.json           canonical JSON of a Manifest; digest = sha256 of it
    refs/<name>.json                  {"digest": ...}: the current target of a named pointer
    ref-history/<name>/<ts>-<digest>  one empty marker per move of the ref

API (other modules code against exactly this; the implementation is being written):
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from vinasmol_core.manifests import Manifest

M = TypeVar("M", bound=Manifest)


class ArtifactStore:
    def __init__(
        self,
        url: str | None = None,
        *,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        cache_dir: Path | None = None,
        max_workers: int = 8,
    ) -> None:
        """`url` defaults to $VINASMOL_STORE, else file:// under the user's data folder.
        S3 credentials default to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL."""
        raise NotImplementedError

    def check_reachable(self) -> None:
        """Raise StoreError naming the URL when the store cannot be listed or written."""
        raise NotImplementedError

    def publish(self, manifest: M, src_dir: Path | None = None, ref: str | None = None) -> M:
        """Upload every file under src_dir that the store lacks, then the manifest, then move `ref`.
        Returns a copy of `manifest` whose `files` lists src_dir's files; its `.digest` names it."""
        raise NotImplementedError

    def resolve(self, ref_or_digest: str) -> str:
        """The manifest digest a ref (or a digest or unique digest prefix) names; StoreError if none."""
        raise NotImplementedError

    def get_manifest(self, ref_or_digest: str) -> Manifest:
        raise NotImplementedError

    def fetch(self, ref_or_digest: str) -> Path:
        """Materialize the artifact into the local cache folder keyed by its digest, verifying every
        sha256 (StoreError naming the artifact and file on mismatch). A second fetch transfers nothing."""
        raise NotImplementedError

    def set_ref(self, ref: str, digest: str) -> None:
        raise NotImplementedError

    def list_refs(self, prefix: str = "") -> dict[str, str]:
        raise NotImplementedError

    def exists(self, ref_or_digest: str) -> bool:
        raise NotImplementedError
