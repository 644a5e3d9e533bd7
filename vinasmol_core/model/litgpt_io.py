"""Conversion between Hugging Face LLaMA folders and litgpt checkpoints, in both directions.

litgpt's own `convert_hf_checkpoint` takes the architecture from its name table only (a resized
vocabulary is lost) and `convert_lit_checkpoint` writes a bare `model.pth`. Here:

- HF -> litgpt: the litgpt `Config` comes from the name table (`Config.from_name(name, vocab_size=...,
  padded_vocab_size=...)`, the name given or detected from config.json's shapes) or, for a model
  that is not in the table, is built from config.json. Written: `lit_model.pth` (a plain state
  dict; a tied embedding is one tensor referenced by both `transformer.wte.weight` and
  `lm_head.weight`), `model_config.yaml`, the tokenizer files, and `extension.json` if the HF
  folder had one.
- litgpt -> HF: see `export.py`.

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

from vinasmol_core.errors import VinaSmolError
from vinasmol_core.model import hf_io

if TYPE_CHECKING:
    import torch
    from litgpt import Config

LIT_WEIGHTS = "lit_model.pth"
LIT_CONFIG = "model_config.yaml"
CUSTOM_NAME = "vinasmol-custom-llama"

_LAYER_MAP_HF_TO_LIT = {
    "input_layernorm.weight": "norm_1.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "mlp.gate_proj.weight": "mlp.fc_1.weight",
    "mlp.up_proj.weight": "mlp.fc_2.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
_LAYER_MAP_LIT_TO_HF = {v: k for k, v in _LAYER_MAP_HF_TO_LIT.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LIT_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_STRUCTURE = ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size")

# Config fields whose defaults make a litgpt model a plain LLaMA (what LlamaForCausalLM computes).
_PLAIN_LLAMA = {
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
        f"{k}={getattr(config, k, v)!r}" for k, v in _PLAIN_LLAMA.items() if getattr(config, k, v) != v
    ]
    if "Gemma" in config.name:
        problems.append(f"name={config.name!r} (Gemma RMSNorm offset)")
    return problems


def _litgpt_rope_adjustments(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return {"factor": float(scaling["factor"])}
    if kind == "llama3":
        return {
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_seq_len": int(scaling["original_max_position_embeddings"]),
        }
    raise VinaSmolError(
        f"config.json: rope scaling type {kind!r} is not supported (use none, linear or llama3)"
    )


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


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def hf_architecture(config_json: dict[str, Any]) -> dict[str, Any]:
    """litgpt Config fields read from a LLaMA config.json (raises for other architectures)."""
    model_type = config_json.get("model_type")
    if model_type != "llama":
        raise VinaSmolError(f"config.json: model_type {model_type!r} is not supported (LLaMA family only)")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config_json.get(key, want) != want:
            raise VinaSmolError(
                f"config.json: {key}={config_json[key]!r} is not supported (expected {want!r})"
            )
    try:
        n_embd = int(config_json["hidden_size"])
        n_head = int(config_json["num_attention_heads"])
        fields = {
            "n_layer": int(config_json["num_hidden_layers"]),
            "n_embd": n_embd,
            "n_head": n_head,
            "n_query_groups": int(config_json.get("num_key_value_heads") or n_head),
            "head_size": int(config_json.get("head_dim") or n_embd // n_head),
            "intermediate_size": int(config_json["intermediate_size"]),
            "block_size": int(config_json.get("max_position_embeddings", 2048)),
            "norm_eps": float(config_json.get("rms_norm_eps", 1e-6)),
            "rope_base": _num(hf_io.rope_theta(config_json)),
            "rope_adjustments": _litgpt_rope_adjustments(hf_io.rope_scaling(config_json)),
        }
    except KeyError as exc:
        raise VinaSmolError(f"config.json: missing field {exc.args[0]!r}") from exc
    return fields


def _name_hint(config_json: dict[str, Any]) -> str:
    raw = str(config_json.get("_name_or_path") or config_json.get("name_or_path") or "")
    return raw.rstrip("/").split("/")[-1]


def detect_litgpt_name(config_json: dict[str, Any], base_vocab_size: int | None = None) -> str | None:
    """The litgpt name-table entry with this config.json's architecture, or None if there is none.

    Candidates must have the same shapes and be plain LLaMA; ties are broken by the `_name_or_path`
    hint, then by agreement of rope base, block size, norm eps and base vocabulary, then base models
    before instruction-tuned ones."""
    from litgpt.config import Config, configs

    arch = hf_architecture(config_json)
    hint = _name_hint(config_json)
    scored = []
    for conf in configs:
        try:
            cfg = Config(**conf)
        except Exception:  # noqa: BLE001 - skip table entries that do not build on their own
            continue
        if any(getattr(cfg, k) != arch[k] for k in _STRUCTURE) or plain_llama_problems(cfg):
            continue
        hinted = hint in (cfg.name, cfg.hf_config.get("name"))
        soft = sum(
            [
                cfg.rope_base == arch["rope_base"],
                cfg.block_size == arch["block_size"],
                cfg.norm_eps == arch["norm_eps"],
                base_vocab_size is not None and cfg.vocab_size == base_vocab_size,
            ]
        )
        tuned = bool(re.search(r"instruct|chat|-it\b", cfg.name, re.IGNORECASE))
        scored.append((not hinted, -soft, tuned, len(cfg.name), cfg.name))
    return min(scored)[-1] if scored else None


def litgpt_config_for(
    config_json: dict[str, Any],
    vocab_size: int,
    padded_vocab_size: int,
    litgpt_name: str | None = None,
    base_vocab_size: int | None = None,
) -> Config:
    """The litgpt Config of an HF LLaMA model with a given vocabulary, from the name table when the
    architecture is there (or `litgpt_name` is given), else built from config.json."""
    from litgpt import Config

    arch = hf_architecture(config_json)
    overrides = {
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "block_size": arch["block_size"],
        "norm_eps": arch["norm_eps"],
        "rope_base": arch["rope_base"],
        "rope_adjustments": arch["rope_adjustments"],
    }
    name = litgpt_name or detect_litgpt_name(config_json, base_vocab_size)
    if name is not None:
        try:
            config = Config.from_name(name, **overrides)
        except ValueError as exc:
            raise VinaSmolError(f"--litgpt-name: {name!r} is not a litgpt model name") from exc
        wrong = [
            f"{k}: {getattr(config, k)} in litgpt's {name!r}, {arch[k]} in config.json"
            for k in _STRUCTURE
            if getattr(config, k) != arch[k]
        ]
        if wrong:
            raise VinaSmolError(f"config.json does not describe litgpt's {name!r}: " + "; ".join(wrong))
        problems = plain_llama_problems(config)
        if problems:
            raise VinaSmolError(f"litgpt's {name!r} is not a plain LLaMA ({', '.join(problems)})")
        return config
    return Config(
        name=CUSTOM_NAME,
        hf_config={},
        n_layer=arch["n_layer"],
        n_embd=arch["n_embd"],
        n_head=arch["n_head"],
        n_query_groups=arch["n_query_groups"],
        head_size=arch["head_size"],
        intermediate_size=arch["intermediate_size"],
        **overrides,
        **{k: v for k, v in _PLAIN_LLAMA.items() if k not in ("n_expert",)},
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


def hf_state_to_litgpt(state: dict[str, torch.Tensor], config: Config, tied: bool) -> dict[str, torch.Tensor]:
    """Rename and fuse HF LLaMA weights into litgpt's layout; pad the vocabulary rows with zeros."""
    import torch

    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == hf_io.EMBED_KEY:
            out["transformer.wte.weight"] = value
        elif key == hf_io.LM_HEAD_KEY:
            if not tied:
                out["lm_head.weight"] = value
        elif key == "model.norm.weight":
            out["transformer.ln_f.weight"] = value
        elif m := _HF_LAYER_RE.match(key):
            layer, rest = int(m.group(1)), m.group(2)
            if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                qkv.setdefault(layer, {})[rest.split(".")[1]] = value
            elif rest in _LAYER_MAP_HF_TO_LIT:
                out[f"transformer.h.{layer}.{_LAYER_MAP_HF_TO_LIT[rest]}"] = value
            elif not rest.endswith("rotary_emb.inv_freq"):
                raise VinaSmolError(f"unexpected weight {key!r} for a LLaMA model")
        else:
            raise VinaSmolError(f"unexpected weight {key!r} for a LLaMA model")
    for layer, parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise VinaSmolError(f"layer {layer}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"transformer.h.{layer}.attn.qkv.weight"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0
        )
    if "transformer.wte.weight" not in out:
        raise VinaSmolError(f"no {hf_io.EMBED_KEY} in the weights")
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in out:
            out[key] = pad_rows(out[key], config.padded_vocab_size)
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    import torch

    if weight.shape[0] > rows:
        raise VinaSmolError(f"embedding has {weight.shape[0]} rows, more than padded_vocab_size {rows}")
    if weight.shape[0] == rows:
        return weight
    pad = torch.zeros(rows - weight.shape[0], weight.shape[1], dtype=weight.dtype)
    return torch.cat([weight, pad], dim=0)


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


def hf_to_litgpt(
    hf_dir: Path,
    out_dir: Path,
    litgpt_name: str | None = None,
    *,
    pad_multiple: int = 1,
    verify: bool = True,
) -> Path:
    """Convert an HF LLaMA folder to a litgpt folder; with `verify`, check logits parity first."""
    import torch

    from vinasmol_core.model.embeddings import EXTENSION_FILE, load_tokenizer

    hf_dir = Path(hf_dir)
    config_json = hf_io.check_hf_dir(hf_dir)
    if pad_multiple < 1:
        raise VinaSmolError(f"pad_multiple must be >= 1, got {pad_multiple}")
    state = hf_io.load_hf_state_dict(hf_dir)
    if hf_io.EMBED_KEY not in state:
        raise VinaSmolError(f"{hf_dir}: no {hf_io.EMBED_KEY} in the weights")
    rows = state[hf_io.EMBED_KEY].shape[0]
    if int(config_json.get("vocab_size", rows)) != rows:
        raise VinaSmolError(
            f"{hf_dir}/config.json: vocab_size {config_json.get('vocab_size')} does not match "
            f"the {rows} rows of {hf_io.EMBED_KEY}"
        )
    vocab_size = load_tokenizer(hf_dir).get_vocab_size(with_added_tokens=True)
    if vocab_size > rows:
        raise VinaSmolError(
            f"{hf_dir}: the tokenizer has {vocab_size} tokens but the model only {rows} rows "
            "(extend the model first)"
        )
    from litgpt.config import find_multiple

    padded = find_multiple(rows, pad_multiple)
    extension = hf_io.read_json(hf_dir / EXTENSION_FILE) if (hf_dir / EXTENSION_FILE).is_file() else {}
    config = litgpt_config_for(
        config_json,
        vocab_size,
        padded,
        litgpt_name,
        base_vocab_size=extension.get("base_vocab_size", vocab_size),
    )
    tied = hf_io.is_tied(config_json, state)
    lit_state = hf_state_to_litgpt(state, config, tied)
    check_state_matches_config(lit_state, config, str(hf_dir))
    if verify:
        from vinasmol_core.model.export import check_parity

        check_parity(lit_state, config, hf_dir, vocab_size)
    with hf_io.atomic_output_dir(Path(out_dir)) as tmp:
        torch.save(lit_state, tmp / LIT_WEIGHTS)
        save_litgpt_config(config, tmp)
        hf_io.copy_tokenizer_files(hf_dir, tmp)
        for name in ("generation_config.json", EXTENSION_FILE):
            if (hf_dir / name).is_file():
                hf_io.write_json(tmp / name, hf_io.read_json(hf_dir / name))
        hf_io.write_json(tmp / "hf_config.json", config_json)
    return Path(out_dir)
