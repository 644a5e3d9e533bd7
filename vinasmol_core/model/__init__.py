"""Model surgery: vocabulary extension with initialised embeddings, litgpt conversion both ways, a
self-verifying Hugging Face export and a tokenizer-independent bits-per-byte evaluation."""

from vinasmol_core.model.base import (
    checkpoint_manifest,
    fetch_base_model,
    publish_checkpoint,
    resolve_model_dir,
)
from vinasmol_core.model.bpb import bits_per_byte, bits_per_byte_report
from vinasmol_core.model.convert import detect_litgpt_name, hf_to_litgpt, litgpt_config_for
from vinasmol_core.model.embeddings import (
    INIT_METHODS,
    extend_model,
    init_new_rows,
    mean_rows,
    segment_tokens,
)
from vinasmol_core.model.export import export_hf
from vinasmol_core.model.litgpt_io import load_litgpt_config, load_litgpt_weights, masked_logits
from vinasmol_core.model.parity import check_parity
from vinasmol_core.model.translations import Seq2SeqTranslations, TranslationSource, TsvTranslations

__all__ = [
    "INIT_METHODS",
    "Seq2SeqTranslations",
    "TranslationSource",
    "TsvTranslations",
    "bits_per_byte",
    "bits_per_byte_report",
    "check_parity",
    "checkpoint_manifest",
    "detect_litgpt_name",
    "export_hf",
    "extend_model",
    "fetch_base_model",
    "hf_to_litgpt",
    "init_new_rows",
    "litgpt_config_for",
    "load_litgpt_config",
    "load_litgpt_weights",
    "masked_logits",
    "mean_rows",
    "publish_checkpoint",
    "resolve_model_dir",
    "segment_tokens",
]
