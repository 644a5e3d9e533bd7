"""Typed manifests: one JSON document describes a whole artifact in the store."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from vinasmol_core import __version__


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)
    sha256: str
    size: int


def check_relative_path(path: str) -> str:
    """Refuse paths that would escape the artifact's folder."""
    if not path or path.startswith(("/", "\\")) or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise ValueError(f"file path {path!r} must be relative to the artifact folder")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file path {path!r} escapes or is not normalised inside the artifact folder")
    return path


class Manifest(BaseModel):
    """Fields every artifact has. Subclasses add the typed fields of their kind."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    name: str = ""
    files: dict[str, FileEntry] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list, description="digests of the manifests it was made from")
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    producer_version: str = __version__
    extra: dict[str, Any] = Field(default_factory=dict, description="free-form notes (JSON only)")

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for path in files:
            check_relative_path(path)
        return files

    def canonical_json(self) -> bytes:
        data = self.model_dump(mode="json")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def identity_json(self) -> bytes:
        """The canonical JSON without `created`: what the digest covers, so that the same content
        published twice (or by two processes at once) is one artifact."""
        data = json.loads(self.canonical_json())
        data.pop("created", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def digest(self) -> str:
        """sha256 of `identity_json()`: names the manifest in the store."""
        return hashlib.sha256(self.identity_json()).hexdigest()


class TokenizerManifest(Manifest):
    kind: Literal["tokenizer"] = "tokenizer"
    vocab_size: int
    base_vocab_size: int
    target_vocab_size: int | None = None
    fertility: dict[str, Any] = Field(default_factory=dict, description="report as JSON")
    fertility_markdown: str = ""


class CheckpointManifest(Manifest):
    kind: Literal["checkpoint"] = "checkpoint"
    format: Literal["hf", "litgpt", "train-state"]
    model_config_: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    stage: str = ""
    step: int = 0
    tokenizer_digest: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    def canonical_json(self) -> bytes:
        data = self.model_dump(mode="json", by_alias=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class DatasetManifest(Manifest):
    kind: Literal["dataset"] = "dataset"
    shards: list[str] = Field(default_factory=list)
    token_counts: dict[str, int] = Field(default_factory=dict, description="per language (and role)")
    tokenizer_digest: str = ""
    source_digests: dict[str, str] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)


class EvalReportManifest(Manifest):
    kind: Literal["eval-report"] = "eval-report"
    model_digest: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


AnyManifest = Annotated[
    TokenizerManifest | CheckpointManifest | DatasetManifest | EvalReportManifest,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyManifest)


def manifest_from_json(data: bytes | str) -> Manifest:
    return _ADAPTER.validate_json(data)
