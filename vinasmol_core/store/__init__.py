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

Modules: `layout` (keys, ref names, default locations), `hashing` (sha256, stat signatures), `backends`
(file://, memory://, s3:// and `open_backend`), `refs` (refs and their history), `publishing` (scan, hash
and upload a folder), `cache` (the verified local cache), `reports`, and `artifacts` (`ArtifactStore`).
"""

from vinasmol_core.store.artifacts import ArtifactStore
from vinasmol_core.store.backends import open_backend
from vinasmol_core.store.backends.base import DownloadJob, ObjInfo, UploadJob, _Backend, _Counters
from vinasmol_core.store.backends.s3 import DATA_PATHS, PART_SIZE
from vinasmol_core.store.hashing import CHUNK, hash_file
from vinasmol_core.store.layout import (
    SUPPORTED_SCHEMES,
    TRASH,
    default_cache_dir,
    default_store_url,
    validate_ref,
)
from vinasmol_core.store.reports import GcReport, RefMove, VerifyReport

__all__ = [
    "CHUNK",
    "DATA_PATHS",
    "PART_SIZE",
    "SUPPORTED_SCHEMES",
    "TRASH",
    "ArtifactStore",
    "DownloadJob",
    "GcReport",
    "ObjInfo",
    "RefMove",
    "UploadJob",
    "VerifyReport",
    "_Backend",
    "_Counters",
    "default_cache_dir",
    "default_store_url",
    "hash_file",
    "open_backend",
    "validate_ref",
]
