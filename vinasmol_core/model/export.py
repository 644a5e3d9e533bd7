"""litgpt -> Hugging Face export that verifies itself.

`export_hf` writes safetensors, config.json (vocab_size = tokenizer size, tie_word_embeddings, RoPE
from the litgpt config, bos/eos/pad ids from the tokenizer), generation_config.json, the tokenizer
files and a model card into a temporary folder, then loads that folder with transformers'
LlamaForCausalLM and compares its logits on a fixed probe with litgpt's GPT holding the same
(dtype-rounded) weights, in float32. Only if every logit agrees within `atol` is the folder renamed
into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.model import hf_io
from vinasmol_core.model.litgpt_io import (
    LIT_WEIGHTS,
    check_state_matches_config,
    hf_rope_scaling,
    litgpt_state_to_hf,
    load_litgpt_config,
    load_litgpt_weights,
    plain_llama_problems,
)
from vinasmol_core.model.parity import PARITY_ATOL, check_parity

if TYPE_CHECKING:
    from litgpt import Config

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_INFO = "export.json"


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _special_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad token ids from tokenizer_config.json (pad falls back to eos)."""
    from vinasmol_core.model.embeddings import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = hf_io.read_json(cfg_path) if cfg_path.is_file() else {}

    def tid(field: str) -> int | None:
        value = cfg.get(field)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        idx = tok.token_to_id(value)
        if idx is None:
            raise VinaSmolError(f"{cfg_path}: {field} {value!r} is not in the vocabulary")
        return idx

    eot = tok.token_to_id("<|endoftext|>")
    bos = tid("bos_token")
    eos = tid("eos_token")
    bos = eot if bos is None else bos
    eos = eot if eos is None else eos
    pad = tid("pad_token")
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos if pad is None else pad}


def hf_config_dict(
    config: Config, vocab_size: int, tie: bool, special: dict[str, int | None], dtype: str
) -> dict[str, Any]:
    """config.json of the exported LlamaForCausalLM, from the litgpt config."""
    import transformers

    scaling = hf_rope_scaling(config.rope_adjustments)
    theta = float(config.rope_base)
    rope_parameters = (
        {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": tie,
        **special,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
    }


def model_card(card: dict[str, Any] | None, config: Config, vocab_size: int) -> str:
    """README.md for the exported model from a `card` dict (title, base_model, method, data, stages,
    metrics, language, license, description)."""
    card = dict(card or {})
    title = card.get("title") or card.get("name") or "VinaSmol"
    base = card.get("base_model", "")
    languages = card.get("language", ["vi", "en"])
    front = [
        "---",
        f"license: {card.get('license', 'apache-2.0')}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "language:",
    ] + [f"- {lang}" for lang in languages]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags:", "- vietnamese", "- vocabulary-extension", "- continued-pretraining", "---", ""]
    lines = front + [f"# {title}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += ["## Model", "", "| field | value |", "| --- | --- |"]
    if base:
        lines.append(f"| base model | {base} |")
    lines += [
        "| architecture | LlamaForCausalLM (tied embeddings) |",
        f"| layers / width / heads / KV groups | {config.n_layer} / {config.n_embd} / {config.n_head} / "
        f"{config.n_query_groups} |",
        f"| vocabulary | {vocab_size} |",
        f"| context length | {config.block_size} (RoPE base {config.rope_base:g}) |",
        "",
    ]
    if card.get("method"):
        lines += ["## Method", "", str(card["method"]), ""]
    data = card.get("data")
    if data:
        lines += ["## Data", ""]
        if isinstance(data, dict):
            lines += [f"- **{k}**: {v}" for k, v in data.items()]
        elif isinstance(data, list):
            lines += [f"- {d}" for d in data]
        else:
            lines.append(str(data))
        lines.append("")
    stages = card.get("stages")
    if stages:
        lines += ["## Training stages", ""]
        if isinstance(stages, list) and all(isinstance(s, dict) for s in stages):
            keys = list(dict.fromkeys(k for s in stages for k in s))
            lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            lines += ["| " + " | ".join(str(s.get(k, "")) for k in keys) + " |" for s in stages]
        else:
            lines += [f"- {s}" for s in stages]
        lines.append("")
    metrics = card.get("metrics")
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        for k, v in metrics.items():
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_hf(
    litgpt_dir: Path,
    out_dir: Path,
    dtype: str = "bfloat16",
    card: dict[str, Any] | None = None,
    *,
    tie: bool | None = None,
    atol: float = PARITY_ATOL,
) -> Path:
    """Export a litgpt folder (plain weights or a training-state `lit_model.pth`) as a verified HF folder.

    `tie=None` ties input and output embeddings when the checkpoint's lm_head equals its embedding (or
    is absent). Raises VinaSmolError and writes nothing when the checkpoint does not match its config
    or the exported model's logits disagree with litgpt's."""
    import torch
    from safetensors.torch import save_file

    from vinasmol_core.model.embeddings import load_tokenizer

    litgpt_dir = Path(litgpt_dir)
    torch_dtype = _torch_dtype(dtype)
    config = load_litgpt_config(litgpt_dir)
    problems = plain_llama_problems(config)
    if problems:
        raise VinaSmolError(f"{litgpt_dir}: not exportable as LlamaForCausalLM ({', '.join(problems)})")
    state, meta = load_litgpt_weights(litgpt_dir / LIT_WEIGHTS)
    state = check_state_matches_config(state, config, str(litgpt_dir / LIT_WEIGHTS))
    vocab_size = load_tokenizer(litgpt_dir).get_vocab_size(with_added_tokens=True)
    if vocab_size != config.vocab_size:
        raise VinaSmolError(
            f"{litgpt_dir}: the tokenizer has {vocab_size} tokens but model_config.yaml says "
            f"vocab_size {config.vocab_size}"
        )
    if tie is None:
        tie = bool(torch.equal(state["transformer.wte.weight"], state["lm_head.weight"]))
    # The weights as they will be stored, so that both sides of the parity check see the same numbers.
    rounded = {k: v.to(torch_dtype) for k, v in state.items()}
    if state["lm_head.weight"] is state["transformer.wte.weight"]:
        rounded["lm_head.weight"] = rounded["transformer.wte.weight"]
    hf_state = litgpt_state_to_hf(rounded, config, vocab_size, tie)
    special = _special_ids(litgpt_dir)
    info = {  # nothing of this machine (paths): the same checkpoint exports to the same bytes anywhere
        "dtype": dtype,
        "tie_word_embeddings": tie,
        "vocab_size": vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "litgpt_name": config.name,
        "training_state": {k: v for k, v in meta.items()},
    }
    with hf_io.atomic_output_dir(Path(out_dir)) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_io.write_json(tmp / "config.json", hf_config_dict(config, vocab_size, tie, special, dtype))
        generation = {
            "_from_model_config": True,
            **special,
            "transformers_version": hf_config_dict(config, vocab_size, tie, special, dtype)[
                "transformers_version"
            ],
        }
        hf_io.write_json(tmp / "generation_config.json", generation)
        hf_io.copy_tokenizer_files(litgpt_dir, tmp)
        (tmp / "README.md").write_text(model_card(card, config, vocab_size), encoding="utf-8")
        lit_fp32 = {k: v.float() for k, v in rounded.items()}
        info["parity_max_abs_diff"] = check_parity(lit_fp32, config, tmp, vocab_size, atol=atol)
        info["parity_atol"] = atol
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)
