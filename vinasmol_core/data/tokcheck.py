"""Which tokenizer a dataset was built with, and refusing a model whose tokenizer differs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vinasmol_core.common.errors import VinaSmolError

EOS_TOKEN = "<|endoftext|>"


def tokenizer_file(tokenizer_dir: Path | str) -> Path:
    """The tokenizer.json of a tokenizer folder (HF tokenizer, HF model or litgpt checkpoint folder)."""
    path = Path(tokenizer_dir)
    if path.is_file() and path.name == "tokenizer.json":
        return path
    candidate = path / "tokenizer.json"
    if not candidate.is_file():
        raise VinaSmolError(f"tokenizer folder {path} has no tokenizer.json")
    return candidate


def tokenizer_digest(tokenizer_dir: Path | str) -> str:
    """sha256 of the folder's tokenizer.json bytes."""
    return hashlib.sha256(tokenizer_file(tokenizer_dir).read_bytes()).hexdigest()


def dataset_tokenizer_digest(dataset_dir: Path | str) -> str:
    """The tokenizer digest recorded in a dataset folder's dataset.json."""
    meta_path = Path(dataset_dir) / "dataset.json"
    if not meta_path.is_file():
        raise VinaSmolError(f"{dataset_dir} is not a prepared dataset (no dataset.json)")
    return str(json.loads(meta_path.read_text(encoding="utf-8"))["tokenizer_digest"])


def check_tokenizer(dataset_dir: Path | str, tokenizer_dir: Path | str) -> None:
    """Raise VinaSmolError when the dataset's tokens were made by another tokenizer than
    `tokenizer_dir`'s (a tokenizer folder or a model folder holding tokenizer.json)."""
    want = dataset_tokenizer_digest(dataset_dir)
    have = tokenizer_digest(tokenizer_dir)
    if want != have:
        raise VinaSmolError(
            f"dataset {dataset_dir} was tokenized with tokenizer sha256 {want[:12]}, but {tokenizer_dir} "
            f"has tokenizer sha256 {have[:12]}: its token ids mean different things to this model. "
            "Prepare the data again with this model's tokenizer (vinasmol data prepare --tokenizer ...)"
        )
