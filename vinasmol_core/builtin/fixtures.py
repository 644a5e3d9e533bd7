"""Tiny stage inputs for tests, demos and CPU benchmarks: a SmolLM2-shaped litgpt checkpoint with an
"extended" vocabulary and a prepared dataset of the built-in sample corpora, both in a store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vinasmol_core.common.manifests import CheckpointManifest

SMOLLM2_360M_SHAPE: dict[str, Any] = {
    "n_layer": 32,
    "n_head": 15,
    "n_embd": 960,
    "n_query_groups": 5,
    "intermediate_size": 2560,
    "block_size": 8192,
    "rope_base": 100000,
}
TINY_SHAPE: dict[str, Any] = {
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 64,
    "n_query_groups": 2,
    "intermediate_size": 128,
    "block_size": 128,
    "rope_base": 10000,
}


def smollm2_config(vocab_size: int, **shape: Any) -> Any:
    """A litgpt Config of the SmolLM2 family (LLaMA blocks, RMSNorm, full RoPE) for `vocab_size`."""
    from litgpt import Config

    geometry = {**TINY_SHAPE, **shape}
    return Config(
        name=f"smollm2-like-{geometry['n_layer']}x{geometry['n_embd']}",
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        norm_eps=1e-5,
        **geometry,
    )


def write_litgpt_checkpoint(out_dir: Path, config: Any, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised (std 0.02), tied litgpt checkpoint folder with the tokenizer files."""
    import shutil

    import torch
    from litgpt.model import GPT
    from litgpt.utils import save_config

    torch.manual_seed(seed)
    model = GPT(config)
    model.apply(model._init_weights)
    model.lm_head.weight = model.transformer.wte.weight
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "lit_model.pth")
    save_config(config, out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


@dataclass
class TinyInputs:
    store_url: str
    init_ref: str
    dataset_ref: str
    base_vocab_size: int
    vocab_size: int
    ckpt_dir: Path
    dataset_dir: Path
    tokenizer_dir: Path


def build_tiny_inputs(
    root: Path,
    store_url: str,
    *,
    base_vocab_size: int = 1024,
    vocab_size: int = 1088,
    docs_per_lang: int = 120,
    **shape: Any,
) -> TinyInputs:
    """Tokenizer with `vocab_size` tokens (the first `base_vocab_size` rows play the base vocabulary),
    a tiny model and a dataset of the sample corpora (vi, en, code main sources and a vi annealing
    source); published to `store_url` under the refs `tiny/init` and `tiny/dataset`."""
    from vinasmol_core.builtin.sample_corpus import write_sample_corpora
    from vinasmol_core.builtin.tiny import build_tiny_tokenizer
    from vinasmol_core.data import PrepareSettings, SourceSpec, prepare_dataset
    from vinasmol_core.store import ArtifactStore

    root = Path(root)
    tok_dir = build_tiny_tokenizer(root / "tokenizer", vocab_size=vocab_size)
    corpora = write_sample_corpora(root / "corpora", docs_per_lang=docs_per_lang, seed=0)
    code_docs = corpora["code"].read_text(encoding="utf-8").splitlines(keepends=True)
    corpora["code"].write_text("".join(code_docs[: max(docs_per_lang // 8, 4)]), encoding="utf-8")
    ckpt = write_litgpt_checkpoint(root / "init", smollm2_config(vocab_size, **shape), tok_dir)
    store = ArtifactStore(store_url)
    store.publish(
        CheckpointManifest(name="tiny-init", format="litgpt", extra={"base_vocab_size": base_vocab_size}),
        ckpt,
        ref="tiny/init",
    )
    sources = [
        SourceSpec(name=f"sample-{lang}", lang=lang, paths=(str(path),)) for lang, path in corpora.items()
    ]
    anneal = write_sample_corpora(root / "annealing", docs_per_lang=max(docs_per_lang // 3, 10), seed=7)
    sources.append(
        SourceSpec(name="sample-vi-annealing", lang="vi", role="annealing", paths=(str(anneal["vi"]),))
    )
    prepare_dataset(
        sources, tok_dir, root / "dataset", PrepareSettings(val_fraction=0.1, dedup=False), store=store,
        ref="tiny/dataset",
    )
    return TinyInputs(
        store_url=store_url,
        init_ref="tiny/init",
        dataset_ref="tiny/dataset",
        base_vocab_size=base_vocab_size,
        vocab_size=vocab_size,
        ckpt_dir=ckpt,
        dataset_dir=root / "dataset",
        tokenizer_dir=tok_dir,
    )
