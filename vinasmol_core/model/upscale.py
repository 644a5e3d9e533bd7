"""Depth up-scaling (SOLAR 10.7B, arXiv 2312.15166, section 2.1): two copies of a model's n
transformer blocks, the last n - m dropped from the first copy and the first n - m from the second,
stacked into 2m blocks. Every other tensor (embeddings, final norm, head) is kept as it is; the
seam between the copies is what the next training stage repairs.

`upscale_depth(src, out, layers_from_each_copy=m)` reads a litgpt checkpoint folder and writes
another one (lit_model.pth, model_config.yaml, the tokenizer and every other file copied), so it
converts and exports like any checkpoint.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

from vinasmol_core.common.errors import ConfigError

_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def block_sources(n_layer: int, layers_from_each_copy: int) -> list[int]:
    """For each block of the up-scaled model, the block of the original it copies."""
    m = layers_from_each_copy
    if not 0 < m <= n_layer:
        raise ConfigError(
            f"upscale.layers_from_each_copy: {m} must be between 1 and the model's {n_layer} layers"
        )
    return list(range(m)) + list(range(n_layer - m, n_layer))


def upscale_depth(src: Path, out: Path, layers_from_each_copy: int) -> Path:
    """Write the up-scaled litgpt checkpoint of `src` into `out` (returned)."""
    import torch

    from vinasmol_core.model.litgpt_io import load_litgpt_config, load_litgpt_weights, save_litgpt_config

    src, out = Path(src), Path(out)
    config = load_litgpt_config(src)
    sources = block_sources(config.n_layer, layers_from_each_copy)
    state, _ = load_litgpt_weights(src / "lit_model.pth")
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _BLOCK.match(key) is None:
            new[key] = value.clone()
    for target, source in enumerate(sources):
        prefix = f"transformer.h.{source}."
        for key, value in state.items():
            if key.startswith(prefix):
                new[f"transformer.h.{target}.{key[len(prefix):]}"] = value.clone()
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in ("lit_model.pth", "model_config.yaml"):
            shutil.copy2(item, out / item.name)
    torch.save(new, out / "lit_model.pth")
    save_litgpt_config(replace(config, n_layer=len(sources)), out)
    return out
