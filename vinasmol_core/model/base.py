"""The base model: a local HF folder or a hub id, and its publication as a checkpoint artifact."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest
from vinasmol_core.model import hf_io

HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "special_tokens_map.json"]


def fetch_base_model(source: str | Path, out_dir: Path | None = None) -> Path:
    """A local HF folder holding the base model.

    `source` is an HF folder (returned as is, or copied to `out_dir`) or a hub id such as
    `HuggingFaceTB/SmolLM2-360M`, downloaded into `out_dir` when the hub is reachable."""
    path = Path(source)
    if path.is_dir():
        hf_io.check_hf_dir(path)
        if not (path / "tokenizer.json").is_file():
            raise VinaSmolError(f"{path} has no tokenizer.json")
        if out_dir is None or Path(out_dir).resolve() == path.resolve():
            return path
        with hf_io.atomic_output_dir(Path(out_dir)) as tmp:
            for item in path.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        return Path(out_dir)
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise VinaSmolError(f"base model {source!r} is neither an existing folder nor a hub id (org/name)")
    if out_dir is None:
        raise VinaSmolError("downloading a hub model needs an output folder")
    try:
        from huggingface_hub import snapshot_download

        with hf_io.atomic_output_dir(Path(out_dir)) as tmp:
            snapshot_download(repo_id=str(source), local_dir=str(tmp), allow_patterns=HF_PATTERNS)
            hf_io.check_hf_dir(tmp)
    except VinaSmolError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise VinaSmolError(f"cannot download {source!r} from the Hugging Face hub: {exc}") from exc
    return Path(out_dir)


def checkpoint_manifest(
    model_dir: Path,
    fmt: str,
    *,
    name: str = "",
    stage: str = "",
    step: int = 0,
    parents: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> CheckpointManifest:
    """A checkpoint manifest describing an HF (`hf`) or litgpt (`litgpt`, `train-state`) folder."""
    model_dir = Path(model_dir)
    if fmt == "hf":
        model_config = hf_io.read_json(model_dir / "config.json")
    else:
        from vinasmol_core.model.litgpt_io import load_litgpt_config

        model_config = asdict(load_litgpt_config(model_dir))
    ext = model_dir / "extension.json"
    notes = dict(extra or {})
    if ext.is_file():
        notes.setdefault("extension", hf_io.read_json(ext))
    return CheckpointManifest(
        name=name,
        format=fmt,  # type: ignore[arg-type]
        model_config=model_config,
        stage=stage,
        step=step,
        tokenizer_digest=hf_io.tokenizer_digest(model_dir),
        parents=list(parents or []),
        metrics=dict(metrics or {}),
        extra=notes,
    )


def publish_checkpoint(store: Any, model_dir: Path, fmt: str, ref: str | None = None, **fields: Any) -> Any:
    """Publish a model folder as a checkpoint artifact (blobs, then manifest, then ref)."""
    return store.publish(checkpoint_manifest(model_dir, fmt, **fields), Path(model_dir), ref=ref)


def resolve_model_dir(spec: str | Path, store_url: str | None = None) -> Path:
    """A local folder for `spec`: an existing folder, or (with a store) a checkpoint ref or digest."""
    path = Path(spec)
    if path.is_dir():
        return path
    if store_url is None:
        raise VinaSmolError(f"{spec} is not a folder (give --store to read it from an artifact store)")
    from vinasmol_core.store import ArtifactStore

    store = ArtifactStore(store_url)
    manifest = store.get_manifest(str(spec))
    if manifest.kind != "checkpoint":
        raise VinaSmolError(f"{spec} names a {manifest.kind} artifact, not a checkpoint")
    return store.fetch(str(spec))
