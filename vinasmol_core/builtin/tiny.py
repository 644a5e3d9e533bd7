"""A tiny SmolLM2-family base (tokenizer and model) for the demo and the tests.

The tokenizer follows SmolLM2's conventions: GPT-2-style byte-level BPE, digits split one by one,
`<|endoftext|>` at id 0 used as bos, eos and unk. It is trained on the built-in English and code
sample text, so it plays the part of an English base that knows no Vietnamese.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vinasmol_core.builtin.sample_corpus import sample_texts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer_config(out_dir: Path, model_max_length: int = 8192) -> None:
    """tokenizer_config.json and special_tokens_map.json with SmolLM2's base conventions."""
    eot = "<|endoftext|>"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # keeps tokenizer.json's own pipeline
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 1024) -> Path:
    """Train a small byte-level BPE on English and code sample text; write it as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = sample_texts("en", 400) + sample_texts("code", 60)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_config(out_dir)
    return out_dir


def build_tiny_base_model(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_query_groups: int = 2,
    intermediate_size: int = 128,
    block_size: int = 512,
    rope_base: float = 10000.0,
    seed: int = 0,
) -> Path:
    """A randomly initialised LlamaForCausalLM with tied embeddings, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_query_groups,
        head_dim=n_embd // n_head,
        max_position_embeddings=block_size,
        rope_theta=rope_base,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out_dir / name)
    return out_dir
