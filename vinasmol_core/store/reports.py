"""What `ref_history`, `verify` and `gc` return."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class RefMove:
    """One move of a ref: when, and to which manifest (None: the ref was deleted)."""

    ref: str
    digest: str | None
    time: datetime


@dataclass
class VerifyReport:
    manifests: int = 0
    blobs: int = 0
    bytes_hashed: int = 0
    refs: int = 0
    problems: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # corrupt blobs deleted by verify(repair=True)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    blobs_total: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    blobs_kept_recent: int = 0
    stale_uploads_removed: int = 0
    dry_run: bool = False
