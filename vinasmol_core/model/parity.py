"""Logit parity between a litgpt checkpoint and a Hugging Face model folder.

Both models run in float32 on a fixed probe of random ids over the whole vocabulary (new tokens
included); the conversion and the export refuse to finish unless every logit agrees within `atol`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model.litgpt_io import build_litgpt_model

if TYPE_CHECKING:
    import torch
    from litgpt import Config

PARITY_ATOL = 1e-4


def probe_ids(vocab_size: int, block_size: int, seed: int = 1234) -> torch.Tensor:
    """The fixed parity probe: two rows of random ids over the whole vocabulary (new tokens included)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    length = max(2, min(48, block_size))
    ids = torch.randint(0, vocab_size, (2, length), generator=gen)
    ids[:, 0] = 0
    ids[1, -8:] = torch.arange(vocab_size - 8, vocab_size).clamp(min=0)
    return ids


def load_hf_model(hf_dir: Path, dtype: Any = None) -> Any:
    """A causal LM from an HF folder in `dtype` (float32 by default), eval mode."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype or torch.float32}
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), **kwargs).eval()


def check_parity(
    lit_state: dict[str, torch.Tensor],
    config: Config,
    hf_dir: Path,
    vocab_size: int,
    atol: float = PARITY_ATOL,
) -> float:
    """Max |logit difference| between litgpt's GPT with `lit_state` and the HF model in `hf_dir`
    (both float32) on the fixed probe; VinaSmolError when it exceeds `atol`."""
    import torch

    ids = probe_ids(vocab_size, config.block_size)
    lit = build_litgpt_model(config, lit_state, dtype=torch.float32)
    with torch.inference_mode():
        lit_logits = lit(ids)[..., :vocab_size].float()
    del lit
    try:
        hf = load_hf_model(hf_dir)
    except Exception as exc:  # noqa: BLE001 - any load failure means the export is unusable
        raise VinaSmolError(f"parity check: transformers cannot load the exported model: {exc}") from exc
    with torch.inference_mode():
        hf_logits = hf(ids).logits.float()
    if hf_logits.shape != lit_logits.shape:
        raise VinaSmolError(
            f"parity check failed: HF logits have shape {tuple(hf_logits.shape)}, "
            f"litgpt {tuple(lit_logits.shape)}"
        )
    diff = float((hf_logits - lit_logits).abs().max())
    if not diff <= atol:
        raise VinaSmolError(
            f"parity check failed: litgpt and transformers logits differ by up to {diff:.3g} (> {atol:g}) "
            "on the probe: the exported config or weights do not describe the checkpoint; nothing written"
        )
    return diff
