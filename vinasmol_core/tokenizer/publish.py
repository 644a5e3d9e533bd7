"""The tokenizer artifact: its manifest (with the fertility report) and publishing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vinasmol_core.common.manifests import TokenizerManifest
from vinasmol_core.tokenizer.extend import ExtendResult
from vinasmol_core.tokenizer.fertility import FertilityReport


def tokenizer_manifest(result: ExtendResult, report: FertilityReport | None = None, *,
                       name: str = "tokenizer", parents: list[str] | None = None,
                       extra: dict[str, Any] | None = None) -> TokenizerManifest:
    """A TokenizerManifest for an extended tokenizer folder (files are filled in on publish)."""
    notes: dict[str, Any] = {
        "new_tokens": result.new_tokens,
        "shortfall": result.shortfall,
        "base_sha256": result.base_sha256,
        "tokenizer_sha256": result.tokenizer_sha256,
        "byte_tokens": result.byte_tokens,
    }
    notes.update(extra or {})
    return TokenizerManifest(
        name=name,
        vocab_size=result.vocab_size,
        base_vocab_size=result.base_vocab_size,
        target_vocab_size=result.target_vocab_size,
        fertility=report.to_json() if report is not None else {},
        fertility_markdown=report.to_markdown() if report is not None else "",
        parents=list(parents or []),
        extra=notes,
    )


def publish_tokenizer(folder: Path, manifest: TokenizerManifest, store_url: str,
                      ref: str | None = None) -> TokenizerManifest:
    """Upload the tokenizer folder and its manifest to the store; move `ref` when given."""
    from vinasmol_core.store import ArtifactStore

    store = ArtifactStore(store_url)
    return store.publish(manifest, Path(folder), ref=ref)
