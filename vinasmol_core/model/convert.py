"""Hugging Face LLaMA folder -> litgpt checkpoint.

litgpt's own `convert_hf_checkpoint` takes the architecture from its name table only (a resized
vocabulary is lost). Here the litgpt `Config` comes from the name table (`Config.from_name(name,
vocab_size=..., padded_vocab_size=...)`, the name given or detected from config.json's shapes) or, for
a model that is not in the table, is built from config.json. Written: `lit_model.pth` (a plain state
dict; a tied embedding is one tensor referenced by both `transformer.wte.weight` and
`lm_head.weight`), `model_config.yaml`, the tokenizer files, and `extension.json` if the HF folder had
one. The other direction is `export.py`; the litgpt folder format itself is `litgpt_io.py`.

Padded rows: see `litgpt_io.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model import hf_io
from vinasmol_core.model.litgpt_io import (
    LAYER_MAP_HF_TO_LIT,
    LIT_WEIGHTS,
    PLAIN_LLAMA,
    check_state_matches_config,
    plain_llama_problems,
    save_litgpt_config,
)
from vinasmol_core.model.parity import check_parity

if TYPE_CHECKING:
    import torch
    from litgpt import Config

CUSTOM_NAME = "vinasmol-custom-llama"
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_STRUCTURE = ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size")


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
        **{k: v for k, v in PLAIN_LLAMA.items() if k not in ("n_expert",)},
    )


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
            elif rest in LAYER_MAP_HF_TO_LIT:
                out[f"transformer.h.{layer}.{LAYER_MAP_HF_TO_LIT[rest]}"] = value
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
