"""Train-state files: tensors in safetensors, everything else in JSON. No pickled objects.

A train-state folder holds
    model-frozen.safetensors     frozen tensors (identical across a stage: one blob in the store)
    model-trainable.safetensors  trainable tensors (split form: new embedding rows separate)
    optimizer.safetensors        AdamW state per trainable tensor: <name>/exp_avg, /exp_avg_sq, /step
    rng-rank<r>.safetensors      RNG states of rank r (torch, CUDA, numpy; Python's in metadata)
    state.json                   step, data position, tokens, world size, resume key, ...
    metrics.jsonl                metrics so far
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import load_file, save, save_file

STATE_FILE = "state.json"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_model_state(out_dir: Path, state: dict[str, torch.Tensor], trainable: set[str]) -> None:
    frozen = {k: v for k, v in state.items() if k not in trainable}
    train = {k: v for k, v in state.items() if k in trainable}
    if frozen:
        save_file(_contiguous(frozen), str(out_dir / "model-frozen.safetensors"))
    save_file(_contiguous(train), str(out_dir / "model-trainable.safetensors"))


def load_model_state(state_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in ("model-frozen.safetensors", "model-trainable.safetensors"):
        path = state_dir / name
        if path.exists():
            out.update(load_file(str(path)))
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (`names` maps id(param) -> name)."""
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            st = optimizer.state.get(param)
            if not st:
                continue
            name = names[id(param)]
            for key, value in st.items():
                if torch.is_tensor(value):
                    out[f"{name}/{key}"] = value
                else:
                    out[f"{name}/{key}"] = torch.tensor(float(value), dtype=torch.float32)
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor]
) -> None:
    """Put saved AdamW state back onto the live parameters (on their device)."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        by_param.setdefault(name, {})[field] = value
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            saved = by_param.pop(name, None)
            if saved is None:
                continue
            optimizer.state[param] = {
                k: (
                    v.to(param.device) if k != "step" else v.to(param.device if group.get("fused") else "cpu")
                )
                for k, v in saved.items()
            }
    if by_param:
        raise ValueError(f"optimizer state for unknown parameters: {sorted(by_param)[:5]}")


def rng_state_bytes() -> bytes:
    """This process's RNG states as one safetensors blob."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, list(internal), gauss]),
    }
    return save(tensors, metadata=meta)


def restore_rng_state(blob: bytes, meta: dict[str, str]) -> None:
    tensors = st_load_bytes(blob)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_state_json(out_dir: Path, data: dict[str, Any]) -> None:
    (out_dir / STATE_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_state_json(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
