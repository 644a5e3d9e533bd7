"""`ArtifactStore`: typed, content-addressed artifacts and named refs over one backend."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from vinasmol_core.common.errors import StoreError
from vinasmol_core.common.manifests import Manifest, manifest_from_json
from vinasmol_core.store.backends import open_backend
from vinasmol_core.store.backends.base import DownloadJob, ObjInfo, UploadJob, _Backend, _Counters
from vinasmol_core.store.backends.s3 import PART_SIZE
from vinasmol_core.store.cache import (
    cache_valid,
    cached_manifest,
    clean_cache_tmp,
    discard,
    remember_manifest,
    write_marks,
)
from vinasmol_core.store.hashing import _file_sig, _stat_sig
from vinasmol_core.store.layout import (
    _HEX64,
    _HEX_PREFIX,
    TRASH,
    _blob_key,
    _check_path,
    _manifest_key,
    _redact_url,
    default_cache_dir,
    validate_ref,
)
from vinasmol_core.store.publishing import hash_and_upload, missing_blobs, scan_folder
from vinasmol_core.store.refs import list_refs as _list_refs
from vinasmol_core.store.refs import move_ref, read_ref
from vinasmol_core.store.refs import ref_history as _ref_history
from vinasmol_core.store.reports import GcReport, RefMove, VerifyReport

M = TypeVar("M", bound=Manifest)
_Needed = dict[str, tuple[int, list[str]]]  # sha256 -> (size, the files that name it)


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
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.max_workers = max(1, int(max_workers))
        self._counters = _Counters()
        self._manifest_cache: dict[str, Manifest] = {}
        self._lock = threading.Lock()
        self._backend: _Backend = open_backend(
            url,
            endpoint_url=endpoint_url,
            key=key,
            secret=secret,
            max_workers=self.max_workers,
            data_path=data_path,
            part_size=part_size,
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
        shown = _redact_url(endpoint) if endpoint else None  # no user or password
        return f"ArtifactStore({self.url!r}" + (f", endpoint_url={shown!r})" if endpoint else ")")

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
        return read_ref(self._backend, name)

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

    def missing_files(self, ref_or_digest: str) -> list[str]:
        """The files of an artifact whose blob the store lacks (or holds with another size), sorted:
        what must be published again before the artifact is reused."""
        m = self.get_manifest(ref_or_digest)
        return sorted(missing_blobs(self._backend, m.files))

    def set_ref(self, ref: str, digest: str) -> None:
        """Point `ref` at a manifest (a digest, digest prefix or another ref); the move is kept as history."""
        validate_ref(ref)
        target = self.resolve(digest)
        if self._load_manifest(target) is None:
            raise StoreError(f"cannot point ref {ref!r} at {digest!r}: no such manifest in store {self.url}")
        if self._read_ref(ref) != target:  # pointing it where it already points is no move
            self._move_ref(ref, target)

    def _move_ref(self, ref: str, digest: str | None) -> None:
        move_ref(self._backend, ref, digest)

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
        return _list_refs(self._backend, prefix)

    def ref_history(self, ref: str) -> list[RefMove]:
        """Every move of `ref`, oldest first."""
        return _ref_history(self._backend, validate_ref(ref))

    # -- publish
    def publish(self, manifest: M, src_dir: Path | None = None, ref: str | None = None) -> M:
        """Upload every file under src_dir that the store lacks, then the manifest, then move `ref`.
        Returns a copy of `manifest` whose `files` lists src_dir's files; its `.digest` names it.

        Without src_dir, every blob the manifest names must already be in the store."""
        if ref is not None:
            validate_ref(ref)
        label = f"artifact {manifest.name or manifest.kind}"
        files: list[tuple[str, Path]] | None = None
        if src_dir is not None:
            src_dir = Path(src_dir)
            files = scan_folder(src_dir)
            self._backend.ensure_ready(write=True)
            entries = hash_and_upload(self._backend, self._counters, files, label)
            new = manifest.model_copy(update={"files": dict(sorted(entries.items()))})
        else:
            new = self._with_stored_blobs(manifest, label)
        digest, data = self._manifest_bytes(new, label)
        existing = self._backend.read(_manifest_key(digest))
        if existing is None:
            self._backend.write(_manifest_key(digest), data)
            stored: Manifest = new
        else:
            stored = self._parse_manifest(digest, existing)
        self._restore_blobs(new, digest, files, existing is None, label)
        with self._lock:
            self._manifest_cache[digest] = stored
        if ref is not None and self._read_ref(ref) != digest:
            self._move_ref(ref, digest)
        return stored.model_copy(deep=True)  # type: ignore[return-value]

    def _with_stored_blobs(self, manifest: M, label: str) -> M:
        """A copy of a manifest published without files: StoreError unless the store has its blobs."""
        for path in manifest.files:
            _check_path(path, f"cannot publish {label}")
        self._backend.ensure_ready(write=True)
        new = manifest.model_copy(deep=True)
        missing = missing_blobs(self._backend, new.files)
        if missing:
            path = sorted(missing)[0]
            raise StoreError(
                f"cannot publish {label}: file {path} (blob {new.files[path].sha256}) is not in store "
                f"{self.url}; publish it with src_dir"
            )
        return new

    def _manifest_bytes(self, new: Manifest, label: str) -> tuple[str, bytes]:
        """The digest and canonical JSON of a manifest, which must parse back to the same digest."""
        data = new.canonical_json()
        try:
            parsed = manifest_from_json(data)
        except (ValidationError, ValueError) as exc:
            raise StoreError(f"cannot publish {label}: manifest does not validate: {exc}") from None
        digest = new.digest
        if parsed.digest != digest:
            raise StoreError(f"cannot publish {label}: manifest does not round-trip through JSON")
        return digest, data

    def _restore_blobs(
        self,
        new: Manifest,
        digest: str,
        files: list[tuple[str, Path]] | None,
        wrote_manifest: bool,
        label: str,
    ) -> None:
        """Check the manifest's blobs once more, now that the stored manifest protects them.

        A concurrent `gc` may have set aside an old unreferenced blob this publish relied on (after the
        first checks, before it could see this manifest): upload it again from `files`, or, when the
        publish has no files, take back the manifest this publish wrote and fail."""
        missing = missing_blobs(self._backend, new.files)
        if not missing:
            return
        if files is None:
            if wrote_manifest:
                self._backend.delete(_manifest_key(digest))
            path = sorted(missing)[0]
            raise StoreError(
                f"cannot publish {label}: file {path} (blob {new.files[path].sha256}) vanished from store "
                f"{self.url} while publishing (a concurrent gc?); publish it with src_dir"
            )
        local = dict(files)
        self._backend.upload(
            [
                UploadJob(_blob_key(e.sha256), local[p], e.size, _stat_sig(local[p]), f"{label}: file {p}")
                for p, e in new.files.items()
                if p in missing
            ],
            self._counters,
        )

    # -- fetch
    def fetch(self, ref_or_digest: str) -> Path:
        """Materialize the artifact into the local cache folder keyed by its digest, verifying every
        sha256 (StoreError naming the artifact and file on mismatch). A second fetch transfers nothing."""
        digest = self._resolve_for_fetch(ref_or_digest)
        final = self.cache_dir / digest
        m = cached_manifest(self.cache_dir, digest)
        if m is not None and final.is_dir() and cache_valid(self.cache_dir, final, digest, m):
            return final
        m = self.get_manifest(digest)
        label = f"artifact {m.name or m.kind} ({digest[:12]})"
        for path in m.files:
            _check_path(path, f"cannot fetch {label}")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        clean_cache_tmp(self.cache_dir)
        if final.exists():  # incomplete or modified copy: replace it
            discard(self.cache_dir, final)
        tmp = self.cache_dir / f".tmp-{digest[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._download_into(tmp, m, label)
            remember_manifest(self.cache_dir, digest, m)
            self._install(tmp, final, digest, m)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _download_into(self, tmp: Path, m: Manifest, label: str) -> None:
        """Download and verify every file of `m` into `tmp`, read-only; equal files are downloaded once."""
        jobs = []
        root = tmp.resolve()
        for path, entry in sorted(m.files.items()):
            dest = (tmp / path).resolve()
            if root not in dest.parents:
                raise StoreError(f"cannot fetch {label}: file {path} escapes the artifact folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            jobs.append(
                DownloadJob(_blob_key(entry.sha256), dest, entry.size, entry.sha256, f"{label}: file {path}")
            )
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

    def _install(self, tmp: Path, final: Path, digest: str, m: Manifest) -> None:
        """Rename the downloaded folder into place and mark its files verified; if a concurrent fetch put
        a valid copy there first, keep that one."""
        try:
            os.rename(tmp, final)
            write_marks(self.cache_dir, digest, {p: _file_sig(final / p) for p in m.files})
        except OSError:
            if final.is_dir() and cache_valid(self.cache_dir, final, digest, m):  # a concurrent fetch won
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise

    def _resolve_for_fetch(self, ref_or_digest: str) -> str:
        name = ref_or_digest.strip() if isinstance(ref_or_digest, str) else ref_or_digest
        if isinstance(name, str) and _HEX64.match(name) and (self.cache_dir / name).is_dir():
            if cached_manifest(self.cache_dir, name) is not None:
                return name  # full digest already cached: no need to ask the store
        return self.resolve(ref_or_digest)

    # -- maintenance
    def verify(self, hashes: bool = True, repair: bool = False) -> VerifyReport:
        """Check every manifest (parses, digest matches) and its blobs (present, size, sha256) and refs.

        `repair` deletes the blobs found corrupt (wrong size or sha256): publishing the same file again
        (re-running the step that made it, `--force`) then uploads it afresh, which it skips while a
        blob of that name is there. Manifests and refs are never changed."""
        report = VerifyReport()
        digests = self.list_manifests()
        needed = self._verify_manifests(report, digests)
        to_hash = self._verify_blobs_present(report, needed, repair)
        if hashes and to_hash:
            self._verify_blob_hashes(report, needed, to_hash, repair)
        self._verify_refs(report, set(digests))
        return report

    def _remove_blob(self, report: VerifyReport, sha: str) -> None:
        self._backend.delete(_blob_key(sha))
        report.removed.append(sha)

    def _verify_manifests(self, report: VerifyReport, digests: list[str]) -> _Needed:
        """Parse every manifest; {sha256: (size, the files that name it)} of the blobs they need."""
        raw = self._backend.read_many([_manifest_key(d) for d in digests])
        needed: _Needed = {}
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
        return needed

    def _verify_blobs_present(self, report: VerifyReport, needed: _Needed, repair: bool) -> list[str]:
        """Check each needed blob is listed with its size; the sha256 of those that are."""
        present = {obj.key: obj for obj in self._backend.list("blobs")}
        to_hash = []
        for sha, (size, users) in sorted(needed.items()):
            obj = present.get(_blob_key(sha))
            if obj is None:
                report.problems.append(f"{users[0]}: blob {sha} is missing")
            elif obj.size != size:
                report.problems.append(f"{users[0]}: blob {sha} has {obj.size} bytes, manifest says {size}")
                if repair:
                    self._remove_blob(report, sha)
            else:
                report.blobs += 1
                to_hash.append(sha)
        return to_hash

    def _verify_blob_hashes(
        self, report: VerifyReport, needed: _Needed, to_hash: list[str], repair: bool
    ) -> None:
        got = self._backend.hash_objects([_blob_key(s) for s in to_hash])
        for sha in to_hash:
            res = got[_blob_key(sha)]
            if isinstance(res, Exception):
                report.problems.append(f"{needed[sha][1][0]}: blob {sha} unreadable: {type(res).__name__}")
            elif res != sha:
                report.problems.append(f"{needed[sha][1][0]}: blob {sha} is corrupt (hashes to {res})")
                if repair:
                    self._remove_blob(report, sha)
            else:
                report.bytes_hashed += needed[sha][0]

    def _verify_refs(self, report: VerifyReport, known: set[str]) -> None:
        try:
            refs = self.list_refs()
        except StoreError as exc:
            report.problems.append(str(exc))
            refs = {}
        for name, d in refs.items():
            report.refs += 1
            if d not in known:
                report.problems.append(f"ref {name!r} points at missing manifest {d}")

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
        doomed = self._doomed_blobs(report, cutoff)
        if dry_run:
            report.blobs_deleted = len(doomed)
            report.bytes_deleted = sum(obj.size for obj in doomed)
        else:
            for obj in doomed:
                self._backend.move(obj.key, f"{TRASH}{obj.key.rsplit('/', 1)[-1]}")
            self._empty_trash(report)
        report.stale_uploads_removed = self._backend.cleanup_stale(cutoff, dry_run)
        return report

    def _doomed_blobs(self, report: GcReport, cutoff: float) -> list[ObjInfo]:
        """The blobs no manifest names, last written before `cutoff`."""
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
        return doomed

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
