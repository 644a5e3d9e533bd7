"""Reading and writing Hugging Face model folders without instantiating a model.

An HF folder here is what `save_pretrained` writes for a LLaMA-family causal LM: `config.json`,
weights as safetensors (one file or shards with an index) or legacy `pytorch_model*.bin`, and the
tokenizer files next to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def read_json(path: Path) -> dict[str, Any]:
    """Load a JSON object, naming the file when it is missing or malformed."""
    if not path.is_file():
        raise VinaSmolError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VinaSmolError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise VinaSmolError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer_dir: Path) -> str:
    """sha256 of tokenizer.json: the identity of a tokenizer across the pipeline."""
    return sha256_file(Path(tokenizer_dir) / "tokenizer.json")


def check_hf_dir(hf_dir: Path) -> dict[str, Any]:
    """Validate an HF causal-LM folder and return its config.json."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise VinaSmolError(f"model folder {hf_dir} does not exist")
    config = read_json(hf_dir / "config.json")
    if not weight_files(hf_dir):
        raise VinaSmolError(f"{hf_dir} holds no model.safetensors / pytorch_model.bin weights")
    return config


def weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of an HF folder (index-listed shards first, else every safetensors/bin file)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in hf_dir.glob("*.bin") if p.name != "training_args.bin")
    return files


def load_hf_state_dict(hf_dir: Path) -> dict[str, Any]:
    """Every tensor of an HF folder, on CPU, in its stored dtype."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for path in weight_files(Path(hf_dir)):
        if not path.is_file():
            raise VinaSmolError(f"weight file {path} listed in the index is missing")
        if path.suffix == ".safetensors":
            state.update(load_file(str(path), device="cpu"))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def is_tied(config: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether input and output embeddings are one tensor in this HF model."""
    if LM_HEAD_KEY not in state:
        return True
    return bool(config.get("tie_word_embeddings", False))


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base from a config.json of either transformers 4 (rope_theta) or 5 (rope_parameters)."""
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling dict (None for plain RoPE), whichever transformers version wrote the file."""
    scaling = config.get("rope_scaling")
    if not scaling:
        params = config.get("rope_parameters") or {}
        scaling = dict(params) if isinstance(params, dict) else None
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    return scaling


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in src; tokenizer.json is required."""
    if not (Path(src) / "tokenizer.json").is_file():
        raise VinaSmolError(f"{src} has no tokenizer.json")
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to out_dir; on success it replaces out_dir, on error it is removed.

    Nothing appears at out_dir unless the body finished without an exception."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise VinaSmolError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
