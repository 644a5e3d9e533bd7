"""The litgpt checkpoint folder: config and weights in and out, the model built from them, and the
litgpt -> HF weight layout.

A litgpt folder holds `lit_model.pth` (a plain state dict, or a training state whose "model" entry holds
one) and `model_config.yaml`. HF -> litgpt is `convert.py`; litgpt -> HF is `export.py`.

Padded rows. `vocab_size` is the tokenizer's size and `padded_vocab_size` defaults to the same
number, so a converted checkpoint has no rows that no token names. When padding is asked for
(`pad_multiple`), the extra rows are zero, every logit read through `masked_logits` has them at
-inf (so sampling and scoring never see them), and the HF export cuts them away
(`config.json: vocab_size` = tokenizer size exactly).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model import hf_io

if TYPE_CHECKING:
    import torch
    from litgpt import Config

LIT_WEIGHTS = "lit_model.pth"
LIT_CONFIG = "model_config.yaml"

LAYER_MAP_HF_TO_LIT = {
    "input_layernorm.weight": "norm_1.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "mlp.gate_proj.weight": "mlp.fc_1.weight",
    "mlp.up_proj.weight": "mlp.fc_2.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
_LAYER_MAP_LIT_TO_HF = {v: k for k, v in LAYER_MAP_HF_TO_LIT.items()}
_LIT_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")

# Config fields whose defaults make a litgpt model a plain LLaMA (what LlamaForCausalLM computes).
PLAIN_LLAMA = {
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "parallel_residual": False,
    "shared_attention_norm": False,
    "rotary_percentage": 1.0,
    "rope_condense_ratio": 1,
    "rope_interleave": False,
    "bias": False,
    "attn_bias": False,
    "lm_head_bias": False,
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "scale_embeddings": False,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_scores_scalar": None,
    "sliding_window_size": None,
    "latent_attention": None,
    "rope_local_base_freq": None,
    "n_expert": 0,
    "norm_1": True,
    "norm_2": True,
}


def plain_llama_problems(config: Config) -> list[str]:
    """Fields that make this litgpt config something LlamaForCausalLM does not compute."""
    problems = [
        f"{k}={getattr(config, k, v)!r}" for k, v in PLAIN_LLAMA.items() if getattr(config, k, v) != v
    ]
    if "Gemma" in config.name:
        problems.append(f"name={config.name!r} (Gemma RMSNorm offset)")
    return problems


def hf_rope_scaling(adjustments: dict[str, Any] | None) -> dict[str, Any] | None:
    """The config.json `rope_scaling` for a litgpt `rope_adjustments` (None for plain RoPE)."""
    if not adjustments:
        return None
    if "low_freq_factor" in adjustments:
        return {
            "rope_type": "llama3",
            "factor": float(adjustments["factor"]),
            "low_freq_factor": float(adjustments["low_freq_factor"]),
            "high_freq_factor": float(adjustments["high_freq_factor"]),
            "original_max_position_embeddings": int(adjustments["original_max_seq_len"]),
        }
    if set(adjustments) == {"factor"}:
        return {"rope_type": "linear", "factor": float(adjustments["factor"])}
    raise VinaSmolError(
        f"model_config.yaml: rope_adjustments {adjustments} cannot be expressed for LlamaForCausalLM"
    )


def load_litgpt_config(litgpt_dir: Path) -> Config:
    """The `model_config.yaml` of a litgpt folder as a litgpt Config."""
    from litgpt import Config

    path = Path(litgpt_dir) / LIT_CONFIG
    if not path.is_file():
        raise VinaSmolError(f"{litgpt_dir} has no {LIT_CONFIG}")
    try:
        return Config.from_file(path)
    except (TypeError, ValueError, AssertionError) as exc:
        raise VinaSmolError(f"{path}: not a valid litgpt config: {exc}") from exc


def save_litgpt_config(config: Config, out_dir: Path) -> None:
    from litgpt.utils import save_config

    save_config(config, Path(out_dir))


def litgpt_state_to_hf(
    state: dict[str, torch.Tensor], config: Config, vocab_size: int, tie: bool
) -> dict[str, torch.Tensor]:
    """Split and rename litgpt weights into HF LLaMA names, cutting the vocabulary to `vocab_size` rows.
    With `tie` only `model.embed_tokens.weight` is written."""
    out: dict[str, torch.Tensor] = {}
    q_size = config.n_head * config.head_size
    kv_size = config.n_query_groups * config.head_size
    for key, value in state.items():
        if key == "transformer.wte.weight":
            out[hf_io.EMBED_KEY] = value[:vocab_size]
        elif key == "lm_head.weight":
            if not tie:
                out[hf_io.LM_HEAD_KEY] = value[:vocab_size]
        elif key == "transformer.ln_f.weight":
            out["model.norm.weight"] = value
        elif m := _LIT_LAYER_RE.match(key):
            layer, rest = int(m.group(1)), m.group(2)
            prefix = f"model.layers.{layer}."
            if rest == "attn.qkv.weight":
                q, k, v = value.split((q_size, kv_size, kv_size), dim=0)
                out[prefix + "self_attn.q_proj.weight"] = q
                out[prefix + "self_attn.k_proj.weight"] = k
                out[prefix + "self_attn.v_proj.weight"] = v
            elif rest in _LAYER_MAP_LIT_TO_HF:
                out[prefix + _LAYER_MAP_LIT_TO_HF[rest]] = value
            else:
                raise VinaSmolError(f"weight {key!r} has no LlamaForCausalLM counterpart")
        else:
            raise VinaSmolError(f"weight {key!r} has no LlamaForCausalLM counterpart")
    if not tie and hf_io.LM_HEAD_KEY not in out:
        out[hf_io.LM_HEAD_KEY] = state["transformer.wte.weight"][:vocab_size]
    return {k: v.contiguous().clone() for k, v in out.items()}


def load_litgpt_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A litgpt state dict from `lit_model.pth`: plain weights, or a training state whose "model" entry
    holds them. Returns (weights, the rest of the training state's scalar entries)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VinaSmolError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise VinaSmolError(f"{path}: cannot be read as a weights-only checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise VinaSmolError(f"{path}: expected a state dict, found {type(obj).__name__}")
    meta: dict[str, Any] = {}
    if "model" in obj and isinstance(obj["model"], dict):
        meta = {k: v for k, v in obj.items() if isinstance(v, int | float | str | bool)}
        obj = obj["model"]
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise VinaSmolError(f"{path}: entry {key!r} is not a tensor")
        for prefix in ("_forward_module.", "_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state, meta


def check_state_matches_config(state: dict[str, torch.Tensor], config: Config, where: str) -> dict[str, Any]:
    """Raise VinaSmolError listing keys and shapes that do not fit a litgpt GPT built from `config`.
    A missing lm_head is filled with the embedding (tied). Returns the completed state."""
    import torch
    from litgpt.model import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    state = dict(state)
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} in the checkpoint, {expected[k]} from the config"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
        if missing:
            parts.append("missing " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else ""))
        raise VinaSmolError(f"{where}: the checkpoint does not match its config: " + " | ".join(parts))
    return state


def build_litgpt_model(config: Config, state: dict[str, torch.Tensor], dtype: Any = None) -> Any:
    """A litgpt GPT in eval mode holding `state` (cast to dtype if given)."""
    import torch
    from litgpt.model import GPT

    state = check_state_matches_config(state, config, config.name)
    with torch.device("meta"):
        model = GPT(config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))  # built on meta above
    return model.eval()


def masked_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits of a litgpt model with the padded rows (ids >= vocab_size) at -inf: softmax, argmax and
    sampling then never pick an id that no token names."""
    if logits.shape[-1] == vocab_size:
        return logits
    masked = logits.clone()
    masked[..., vocab_size:] = float("-inf")
    return masked
